#!/usr/bin/env bash
# Create .venv (if needed) and install requirements.txt + massl (editable). A no-op when up to date.
# Usage: source scripts/setup_env.sh   (or run it; then use .venv/bin/python)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MASSL_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.massl-requirements"
want="$(cat "$root/requirements.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (torch from the pinned wheel; about a minute)"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
  # deepspeed is a source distribution whose build imports torch: install it after everything else,
  # without build isolation (an isolated build could fetch another torch), torch pinned to ours.
  "$venv/bin/python" -m pip install -q -r <(grep -v '^deepspeed==' "$root/requirements.txt")
  "$venv/bin/python" -m pip install -q setuptools wheel
  "$venv/bin/python" -m pip install -q --no-build-isolation -c <(grep -E '^torch(vision)?==' "$root/requirements.txt") \
    $(grep '^deepspeed==' "$root/requirements.txt")
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  echo "$want" > "$stamp"
fi

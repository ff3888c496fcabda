#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite; exits non-zero on any failure.
# Extra arguments go to pytest, e.g.:  scripts/run_tests.sh -k loss
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# The type checker first (mypy.ini: massl/, strict on the method and the engine interface); offline.
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"

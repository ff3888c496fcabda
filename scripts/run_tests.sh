#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite; exits non-zero on any failure.
# Extra arguments go to pytest, e.g.:  scripts/run_tests.sh -k loss
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# The tests write checkpoints, shards and logs under the temp dir (about 300 MiB; pytest keeps its last 3 runs):
# with too little room hundreds of them would fail at once with ENOSPC, so say it in one line first.
tmp="${TMPDIR:-/tmp}"
need_mib=1024
free_mib=$(( $(df -Pk "$tmp" | awk 'NR==2 {print $4}') / 1024 ))
if [ "$free_mib" -lt "$need_mib" ]; then
  echo "error: $tmp has ${free_mib} MiB free; the test suite needs about ${need_mib} MiB there: free some space or set TMPDIR to a larger disk" >&2
  exit 1
fi
# The type checker first (mypy.ini: massl/, strict on the method and the engine interface); offline.
.venv/bin/python -m mypy
# Two worker processes (pytest-xdist; MASSL_TEST_WORKERS=0 runs in this one): much of a test's time
# is process start-up and waiting, so a 2-core machine runs the suite in about 60% of the time.
# --dist loadgroup keeps the files that start a cluster in one worker, one after the other.
workers="${MASSL_TEST_WORKERS:-2}"
exec .venv/bin/python -m pytest -q --durations=15 -n "$workers" --dist loadgroup tests "$@"

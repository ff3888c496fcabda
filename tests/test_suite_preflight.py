"""scripts/run_tests.sh (what CI runs) refuses in one line, before mypy or any test, when the temp
dir has too little room; otherwise hundreds of tests would each fail with ENOSPC."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to mount a small tmpfs in a private mount namespace")
def test_run_tests_refuses_a_nearly_full_temp_dir(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # The tmpfs lives in the child's own mount namespace: it is gone when the child ends.
    script = (f'mount -t tmpfs -o size=64m massl-small "{small}" || exit 99; '
              f'TMPDIR="{small}" exec bash scripts/run_tests.sh -k no_such_test')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    if r.returncode == 99 or (r.returncode == 1 and "unshare:" in r.stderr):
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {r.stderr.strip()}")
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {small} has "), r.stderr
    assert "set TMPDIR to a larger disk" in last
    assert "Success" not in r.stdout and "passed" not in r.stdout, r.stdout  # stopped before mypy and pytest

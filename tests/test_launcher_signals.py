"""Stop signals reach the ranks under launch/torchrun.sh: a signal to the script is forwarded to
the ranks, and a rank whose launcher died (SIGUSR1 kills torchrun) stops by itself; either way
the run checkpoints, exits 75 on the rank and leaves nothing running."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import tiny_overrides
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes_of(run: str) -> list[int]:
    """The processes whose command line names the run directory (ranks live in their own sessions)."""
    out = subprocess.run(["pgrep", "-f", run], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("target", ["script", "launcher"])
def test_a_signal_to_the_torchrun_launch_reaches_the_rank(digits_dir, tmp_path, target):
    import sys

    run, log = str(tmp_path / "run"), tmp_path / "log"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "1", str(config)] + tiny_overrides(
        os.path.join(digits_dir, "train"), run) + ["optim.epochs=50", "run.checkpoint_every=1000"]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "step 3/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "step 3/" in log.read_text(), log.read_text()
        if target == "script":
            proc.send_signal(signal.SIGUSR1)  # before: killed the script (exec'd torchrun) while the rank trained on
        else:
            launcher = [p for p in processes_of(run) if "torch.distributed.run" in open(f"/proc/{p}/cmdline").read()]
            os.kill(launcher[0], signal.SIGUSR1)  # torchrun dies of it; the rank sees its parent go
        proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while (group_alive(proc.pid) or processes_of(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(proc.pid) and not processes_of(run), "processes left"
        text = log.read_text()
        assert "stop signal received" in text, text  # before: the rank trained on, unsupervised
        assert [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step_")], text
        assert os.path.exists(os.path.join(run, "summary.json"))  # the rank got to the end of its run
    finally:
        for pid in processes_of(run):
            os.kill(pid, signal.SIGKILL)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

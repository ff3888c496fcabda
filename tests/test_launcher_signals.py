"""Stop signals reach the ranks under launch/torchrun.sh and launch/deepspeed.sh: a signal to the
script is forwarded to the ranks, and ranks whose launcher died (SIGUSR1 kills torchrun and
DeepSpeed's runner, SIGTERM the runner too) stop by themselves; either way every rank
checkpoints and exits 75, and nothing of the run is left running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from massl.checkpoint.manager import verify
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


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def torchrun_launch(tmp_path, config: str) -> tuple[list[str], dict, int, str]:
    """(command, environment, ranks, what names the launcher process in its command line)."""
    return (["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "1", config],
            {"PYTHON": sys.executable, "MASTER_PORT": str(free_port())}, 1, "torch.distributed.run")


def deepspeed_launch(tmp_path, config: str) -> tuple[list[str], dict, int, str]:
    """One host (`localhost slots=2`), DeepSpeed's runner starting its local launcher and 2 ranks."""
    pytest.importorskip("deepspeed")
    runner = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.isfile(runner):
        pytest.skip("the deepspeed launcher script is not installed beside this python")
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = {"DEEPSPEED": runner, "DS_ACCELERATOR": "cpu", "DS_LAUNCHER_ARGS": f"--master_port {free_port()}",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return (["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), str(tmp_path / "hostfile"), config], env, 2,
            f"{runner} ")


@pytest.mark.slow
@pytest.mark.parametrize("launch, target, signum, status", [
    # before: SIGUSR1 killed the script (exec'd torchrun) while the rank trained on
    # torchrun reports a rank's exit 75 as a failure (1); the script, which counts the ranks that
    # stopped, turns it into 75 (before: 1)
    ("torchrun", "script", signal.SIGUSR1, 75),
    ("torchrun", "launcher", signal.SIGUSR1, 75),  # torchrun dies of it; the rank sees its parent go (before: 138)
    ("deepspeed", "script", signal.SIGTERM, 75),  # DeepSpeed's launcher passes on the ranks' status
    # before: the runner died, the script exited and launch.py and its ranks trained on
    ("deepspeed", "launcher", signal.SIGTERM, 128 + signal.SIGTERM),
])
def test_a_signal_to_the_launch_reaches_every_rank(digits_dir, tmp_path, launch, target, signum, status):
    run, log = str(tmp_path / "run"), tmp_path / "log"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args, env, ranks, launcher_name = {"torchrun": torchrun_launch, "deepspeed": deepspeed_launch}[launch](
        tmp_path, str(config))
    args += tiny_overrides(os.path.join(digits_dir, "train"), run) + [
        "optim.epochs=50", "run.checkpoint_every=1000", "run.log_all_ranks=true"]
    env = {**os.environ, "PYTHONPATH": ROOT, **env}
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "step 3/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "step 3/" in log.read_text(), log.read_text()
        if target == "script":
            proc.send_signal(signum)
        else:
            os.kill(next(p for p in processes_of(run) if launcher_name in cmdline(p)), signum)
        assert proc.wait(timeout=180) == status  # the launcher's status
        deadline = time.monotonic() + 60
        while (group_alive(proc.pid) or processes_of(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(proc.pid) and not processes_of(run), "processes left"
        text = log.read_text()
        # each rank's own lines (rank 0's unprefixed): it stopped at the checkpoint and exited 75
        # (before: DeepSpeed's ranks trained on, unsupervised)
        for rank in range(ranks):
            mine = [s.split("] ", 1)[-1] for s in text.splitlines() if s.startswith(f"[rank {rank} on ")] if rank \
                else [s for s in text.splitlines() if s.startswith("massl: ")]
            for line in ("massl: stop signal received", "massl: exiting with status 75"):
                assert any(s.startswith(line) for s in mine), (rank, line, text)
        steps = [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step_")]
        assert len(steps) == 1 and verify(os.path.join(run, "checkpoints", steps[0])) == (True, ""), text
        assert os.path.exists(os.path.join(run, "summary.json"))  # rank 0 got to the end of its run
    finally:
        for pid in processes_of(run):
            os.kill(pid, signal.SIGKILL)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_failed_rank_under_torchrun_sh_is_not_reported_as_a_stop(tmp_path):
    """launch/torchrun.sh ends with 75 only when its ranks stopped at a checkpoint: a rank that
    fails (here a user error, massl-train's exit 2) leaves torchrun's failure status."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args, env, _, _ = torchrun_launch(tmp_path, str(config))
    done = subprocess.run(args + ["optim.no_such_key=1"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode not in (0, 75) and "no_such_key" in done.stdout + done.stderr, done.stderr[-3000:]
    assert "stopped at a checkpoint" not in done.stderr

"""Checkpoints: an interrupted and resumed run equals an uninterrupted one; broken checkpoints are skipped."""
import json
import os

import pytest
import torch

import massl.objective
from massl.checkpoint import CheckpointManager, is_complete
from massl.train import NonFiniteLossError, train


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory):
    from massl.config import load_config
    from tests.conftest import tiny_overrides

    out = str(tmp_path_factory.mktemp("full"))
    cfg = load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + ["run.max_steps=14"])
    train(cfg)
    return losses(out)


def test_resumed_run_equals_uninterrupted(tiny_config, uninterrupted, tmp_path):
    out = str(tmp_path / "resumed")
    train(tiny_config("run.max_steps=6", "run.checkpoint_every=3", output_dir=out))
    train(tiny_config("run.max_steps=14", "run.checkpoint_every=3", output_dir=out))  # resume: auto
    got = losses(out)
    assert sorted(got) == list(range(1, 15))
    for step in range(1, 15):  # bitwise equal, including 8 steps after the resume at step 6
        assert got[step] == uninterrupted[step], step


def test_truncated_checkpoint_falls_back_to_previous(tiny_config, uninterrupted, tmp_path, caplog):
    out = str(tmp_path / "trunc")
    train(tiny_config("run.max_steps=8", "run.checkpoint_every=4", output_dir=out))
    newest = os.path.join(out, "checkpoints", "step_000000008")
    state = os.path.join(newest, "engine", "state.pt")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    assert not is_complete(newest)[0]
    assert CheckpointManager(out, 3).latest_complete().endswith("step_000000004")
    assert "step_000000008 is incomplete" in caplog.text
    caplog.clear()
    os.rename(os.path.join(out, "metrics.jsonl"), os.path.join(out, "metrics.first.jsonl"))
    train(tiny_config("run.max_steps=12", "run.checkpoint_every=4", output_dir=out))
    assert "step_000000008 is incomplete" in caplog.text
    got = losses(out)
    assert sorted(got) == list(range(5, 13))  # resumed from step 4, not 8
    assert all(got[s] == uninterrupted[s] for s in got)


def test_leftover_temporary_checkpoint_is_ignored(tiny_config, tmp_path):
    out = str(tmp_path / "tmpdir")
    train(tiny_config("run.max_steps=2", "run.checkpoint_every=2", output_dir=out))
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step_000000009"))  # a save cut short
    assert CheckpointManager(out, 3).latest_complete().endswith("step_000000002")


def test_keep_last(tiny_config, tmp_path):
    out = str(tmp_path / "keep")
    train(tiny_config("run.max_steps=8", "run.checkpoint_every=2", "run.keep_last=2", output_dir=out))
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["latest", "step_000000006", "step_000000008"]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_000000008"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    real = massl.objective.massl_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        if args[0].is_meta:  # the FLOP count at the start of the run (massl/flops.py), not a step
            return real(*args, **kwargs)
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(massl.objective, "massl_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match="non-finite at step 3"):
        train(tiny_config("run.max_steps=10", "run.checkpoint_every=2", "run.log_every=5", output_dir=out))
    ckpts = CheckpointManager(out, 3)
    assert [s for s, _ in ckpts.step_dirs()] == [2]
    state = torch.load(os.path.join(ckpts.latest_complete(), "engine", "state.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_sigterm_checkpoints_and_exits(digits_dir, tmp_path):
    """A preempted job (SIGTERM from Slurm or kill) saves a checkpoint at the step all ranks agree
    on, off the checkpoint_every grid, and exits 75 (resuming from it is what the tests above check)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import tiny_overrides

    out = str(tmp_path / "sig")
    args = [sys.executable, "-m", "massl.cli"] + tiny_overrides(os.path.join(digits_dir, "train"), out) + [
        "run.max_steps=400", "run.checkpoint_every=1000", "optim.epochs=50"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout  # massl.signals.STOPPED_EXIT
    assert "stop signal received" in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stopped_by_signal"] and 3 <= summary["final_step"] < 400
    saved = CheckpointManager(out, 3).latest_complete()
    assert saved.endswith(f"step_{summary['final_step']:09d}")


def test_a_stop_signal_during_start_up_is_kept(tiny_config, tmp_path):
    """massl-train records stop signals from its start (stop_signals_recorded): one that arrives
    before the loop's handler exists (Python's default for SIGUSR1 is to die) stops the run at
    its first check, with a checkpoint."""
    import signal

    from massl.signals import stop_signals_recorded

    out = str(tmp_path / "early")
    with stop_signals_recorded():
        os.kill(os.getpid(), signal.SIGUSR1)
        summary = train(tiny_config("run.max_steps=30", "run.checkpoint_every=1000", output_dir=out))
    assert summary["stopped_by_signal"] and summary["final_step"] == 1
    assert CheckpointManager(out, 3).latest_complete().endswith("step_000000001")
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the previous handler is back

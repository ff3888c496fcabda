"""Ctrl-C stops like SIGTERM (checkpoint, exit 75), a second one exits at once; one run per run
directory (a lock the kernel releases when its holder dies); a resume past run.max_steps says so."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from massl.errors import UserError
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_training(digits_dir, run: str, log_path) -> subprocess.Popen:
    args = [sys.executable, "-m", "massl.cli"] + tiny_overrides(os.path.join(digits_dir, "train"), run) + [
        "optim.epochs=50", "run.checkpoint_every=1000"]
    with open(log_path, "w") as out:
        return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(log_path, text: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in log_path.read_text(), log_path.read_text()


def finish(proc: subprocess.Popen, seconds: float = 60) -> int:
    try:
        return proc.wait(timeout=seconds)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_75(digits_dir, tmp_path):
    run, log = str(tmp_path / "run"), tmp_path / "log"
    proc = start_training(digits_dir, run, log)
    wait_for(log, "step 3", proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the whole process group
    rc = finish(proc)
    text = log.read_text()
    assert rc == 75 and "Traceback" not in text and "KeyboardInterrupt" not in text, text  # before: a traceback, rc 1
    assert [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step_")], text


def test_a_second_ctrl_c_exits_at_once(monkeypatch, capsys):
    import torch

    import massl.signals as signals

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(signals.os, "_exit", exit_now)
    stop = signals.StopOnSignal(torch.device("cpu"))
    stop._handle(signal.SIGINT, None)  # the first: recorded, the loop checkpoints at the next poll
    assert stop.agreed()
    with pytest.raises(SystemExit) as e:
        stop._handle(signal.SIGINT, None)
    assert e.value.code == 130 and "second interrupt: exiting now" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tiny_config, tmp_path):
    from massl.train import train

    run = str(tmp_path / "run")
    os.makedirs(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from massl.runlock import acquire_run_lock; "
                               "acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", run],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"^run.output_dir: .* is in use by another run \(host .*, pid {holder.pid}\)"):
            train(tiny_config("run.max_steps=1", output_dir=run))  # before: both ran, interleaving their outputs
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
    finally:
        holder.kill()  # dies without releasing: the kernel does
        holder.wait()
    assert train(tiny_config("run.max_steps=1", output_dir=run))["final_step"] == 1


def test_a_resume_past_max_steps_says_so_and_writes_nothing(tiny_config, tmp_path, caplog):
    from massl.train import train

    run = str(tmp_path / "run")
    train(tiny_config("run.max_steps=2", "run.tensorboard=true", output_dir=run))
    events = sorted(os.listdir(os.path.join(run, "tb")))
    lines = open(os.path.join(run, "metrics.jsonl")).read()
    with caplog.at_level(logging.INFO, logger="massl"):
        summary = train(tiny_config("run.max_steps=2", "run.tensorboard=true", output_dir=run))
    assert summary["final_step"] == 2
    said = [r.getMessage() for r in caplog.records if "nothing to do" in r.getMessage()]
    assert len(said) == 1 and "run.max_steps=2" in said[0], said  # before: silent
    assert sorted(os.listdir(os.path.join(run, "tb"))) == events  # before: a new event file
    assert open(os.path.join(run, "metrics.jsonl")).read() == lines


def test_massl_shard_ctrl_c_is_one_line(monkeypatch, capsys):
    import massl.tools.shard as shard_tool

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_tool, "run", interrupted)
    assert shard_tool.main(["whatever", "--out", "x"]) == 130  # before: a KeyboardInterrupt traceback
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted (Ctrl-C)") and err.count("\n") == 1

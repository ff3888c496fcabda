"""A 2-rank FSDP, ZeRO-2 or ZeRO-3 run killed with SIGKILL resumes exactly from its last complete checkpoint.

The run (torchrun, activation checkpointing, drop-path 0.1 so that the RNG state matters,
global-norm clipping; AdamW for DeepSpeed) checkpoints every 3 steps; both ranks are SIGKILLed inside the write of
step 6, after their files are written but before the checkpoint is sealed. Two newer sealed-looking
checkpoints are planted, one with a truncated shard file and one without a manifest. The restart
with `resume: auto` must skip all three, continue from step 3, and reproduce the killed run's
losses of steps 4-6 (which it logged before the kill, uninterrupted up to there; the restart
moves those records aside, so metrics.jsonl logs each step once).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from massl.checkpoint import MANIFEST, is_complete
from tests.engines_common import losses, step_dir, tiny_config, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def _launch(config: str, hold_step: int, markers: str, log) -> subprocess.Popen:
    for name in os.listdir(markers):
        os.remove(os.path.join(markers, name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.engines_worker", config, str(hold_step), markers]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # reaped since the check above
        return False


def _kill_all(proc: subprocess.Popen, markers: str) -> None:
    """SIGKILL the training processes (by the ids they wrote: torchrun starts them in sessions of
    their own) and the launcher (in its own session too)."""
    pids = []
    for name in os.listdir(markers):
        if name.startswith("pid."):
            with open(os.path.join(markers, name)) as f:
                pids.append(int(f.read()))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a training process survived SIGKILL"


def _read(path) -> str:
    with open(path) as f:
        return f.read()


# engine settings -> the file the engine writes last into its folder (the kill must come after it)
SETTINGS = {
    "fsdp": ({"name": "fsdp"}, {}, ".metadata"),
    "zero2": ({"name": "deepspeed", "zero_stage": 2}, {"name": "adamw", "lr": 0.05}, "layout.json"),
    "zero3": ({"name": "deepspeed", "zero_stage": 3}, {"name": "adamw", "lr": 0.05}, "layout.json"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_run_killed_mid_checkpoint_resumes_and_reproduces_losses(tmp_path, setting):
    engine, optim, last_file = SETTINGS[setting]
    if engine["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
    data = write_images(str(tmp_path / "images"))
    out = str(tmp_path / "run")
    cfg = tiny_config(data, out, engine["name"], 2, run={"max_steps": 7, "checkpoint_every": 3},
                      model={"drop_path": 0.1}, optim={"clip_mode": "global", **optim},
                      engine={**engine, "activation_checkpointing": "full"})
    config = str(tmp_path / "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    markers = str(tmp_path / "markers")
    os.makedirs(markers)

    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch(config, 6, markers, log)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not all(os.path.exists(os.path.join(markers, f"held.{r}")) for r in (0, 1)):
                if proc.poll() is not None:
                    pytest.fail("the run ended before the step-6 checkpoint write:\n" + _read(tmp_path / "killed.log"))
                if time.monotonic() > deadline:
                    pytest.fail("no rank reached the step-6 checkpoint write:\n" + _read(tmp_path / "killed.log"))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # (torchrun exits only once its ranks have)
                _kill_all(proc, markers)

    root = os.path.join(out, "checkpoints")
    cut_short = os.path.join(root, ".tmp-step_000000006")
    assert os.path.isfile(os.path.join(cut_short, "engine", last_file)), "the kill should land after the engine's files"
    assert not os.path.exists(step_dir(out, 6))
    assert is_complete(step_dir(out, 3))[0]
    # Newer directories that look like checkpoints but are not complete.
    truncated, unsealed = step_dir(out, 5), step_dir(out, 4)
    shutil.copytree(step_dir(out, 3), truncated)
    shard = max((os.path.join(d, n) for d, _, names in os.walk(os.path.join(truncated, "engine")) for n in names),
                key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    shutil.copytree(step_dir(out, 3), unsealed)
    os.remove(os.path.join(unsealed, MANIFEST))

    with open(tmp_path / "resumed.log", "w") as log:
        proc = _launch(config, 0, markers, log)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                _kill_all(proc, markers)
    text = _read(tmp_path / "resumed.log")
    assert rc == 0, text
    assert f"resumed from {step_dir(out, 3)}" in text
    assert "step_000000005 is incomplete" in text and "step_000000004 is incomplete" in text

    # Each step logged once: the killed run's records after step 3 (and the look-alike step 4 and
    # 5 directories) went aside with a message.
    assert "moved what belongs to another history (2 checkpoint(s), 3 metrics record(s)" in text
    resumed = losses(out)
    (aside,) = os.listdir(os.path.join(out, "superseded"))
    killed = losses(os.path.join(out, "superseded", aside))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6, 7] and sorted(killed) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(resumed[s] - killed[s]) <= 1e-6 * abs(killed[s]), f"step {s}: {resumed[s]} vs {killed[s]}"
    assert is_complete(step_dir(out, 7))[0]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]

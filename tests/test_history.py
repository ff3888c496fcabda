"""A run directory keeps one history checkpoints of another history are never deleted
or silently resumed (item 2), a damaged checkpoint is detected by its checksums (item 4), a resume
refuses settings that cannot continue the checkpoint (item 6), and metrics.jsonl logs each step
once after a crash-resume, flushed record by record (item 11). References: an uninterrupted run of
the same config, files read directly (json, zipfile), TensorBoard's own event reader."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

import massl.objective
from massl.checkpoint import read_checkpoint_manifest
from massl.config import ConfigError
from massl.train import train
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> dict:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def checkpoints(run_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))


def latest(run_dir: str) -> str:
    return open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()


def superseded(run_dir: str) -> str:
    (stamp,) = os.listdir(os.path.join(run_dir, "superseded"))
    return os.path.join(run_dir, "superseded", stamp)


def history(run_dir: str, name: str) -> str:
    return read_checkpoint_manifest(os.path.join(run_dir, "checkpoints", name))["history"]


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory):
    from massl.config import load_config

    out = str(tmp_path_factory.mktemp("full"))
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + ["run.max_steps=10"]))
    return losses(out)


# ----------------------------------------------------------------------------- item 2


def test_a_new_run_in_a_used_directory_moves_the_old_history_aside(tiny_config, uninterrupted, tmp_path, caplog):
    """Before: keep_last pruned by step number, so the new run's step_2 was deleted as soon as it
    was sealed (older steps 4 and 8 were higher), and the next resume took the old step 8."""
    out = str(tmp_path / "run")
    train(tiny_config("run.max_steps=8", "run.checkpoint_every=4", "optim.lr=0.01", output_dir=out))
    old_metrics = records(out)
    train(tiny_config("run.max_steps=4", "run.checkpoint_every=2", "run.keep_last=2", "run.resume=never",
                      output_dir=out))
    assert "starts from scratch" in caplog.text and "moved what belongs to another history" in caplog.text
    assert checkpoints(out) == ["step_000000002", "step_000000004"] and latest(out) == "step_000000004"
    assert history(out, "step_000000002") == history(out, "step_000000004")
    aside = superseded(out)
    assert sorted(os.listdir(os.path.join(aside, "checkpoints"))) == ["step_000000004", "step_000000008"]
    assert records(aside) == old_metrics  # kept, whole
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    train(tiny_config("run.max_steps=6", "run.checkpoint_every=2", "run.keep_last=2", output_dir=out))
    assert "resumed from" in caplog.text and checkpoints(out) == ["step_000000004", "step_000000006"]
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and all(got[s] == uninterrupted[s] for s in got)


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tiny_config, uninterrupted, tmp_path, caplog):
    """Before: `latest` named the branch's checkpoint but the next resume: auto took the old run's
    higher-numbered one, and metrics.jsonl held both runs' steps 5-8."""
    out = str(tmp_path / "run")
    train(tiny_config("run.max_steps=8", "run.checkpoint_every=4", output_dir=out))
    step4 = os.path.join(out, "checkpoints", "step_000000004")
    train(tiny_config("run.max_steps=6", "run.checkpoint_every=2", f"run.resume={step4}", output_dir=out))
    assert "resumes from step 4" in caplog.text
    assert checkpoints(out) == ["step_000000004", "step_000000006"] and latest(out) == "step_000000006"
    assert os.listdir(os.path.join(superseded(out), "checkpoints")) == ["step_000000008"]
    assert [r["step"] for r in records(superseded(out))] == [5, 6, 7, 8]
    train(tiny_config("run.max_steps=10", "run.checkpoint_every=2", output_dir=out))
    assert f"steps 6 -> 10, resumed from {os.path.join(out, 'checkpoints', 'step_000000006')}" in caplog.text
    got = losses(out)
    assert sorted(got) == list(range(1, 11)) and all(got[s] == uninterrupted[s] for s in got)


# ----------------------------------------------------------------------------- item 4


def flip_tensor_bytes(path: str) -> None:
    """Invert 64 bytes in the middle of the largest tensor record of a torch.save file (a zip
    archive: the tensors are stored uncompressed in its data/ records); the size is unchanged."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        data = f.read(64)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def test_flipped_bytes_in_tensor_data_fall_back_to_the_previous_checkpoint(tiny_config, uninterrupted, tmp_path,
                                                                          caplog):
    """Before: the sizes matched, the garbage weights loaded silently and every rerun picked them."""
    out = str(tmp_path / "run")
    train(tiny_config("run.max_steps=8", "run.checkpoint_every=4", output_dir=out))
    damaged = os.path.join(out, "checkpoints", "step_000000008")
    size = os.path.getsize(os.path.join(damaged, "engine", "state.pt"))
    flip_tensor_bytes(os.path.join(damaged, "engine", "state.pt"))
    assert os.path.getsize(os.path.join(damaged, "engine", "state.pt")) == size
    train(tiny_config("run.max_steps=10", "run.checkpoint_every=4", output_dir=out))
    assert (f"checkpoint {damaged} is incomplete or damaged (engine/state.pt does not match the sha256 recorded"
            in caplog.text)
    assert f"steps 4 -> 10, resumed from {os.path.join(out, 'checkpoints', 'step_000000004')}" in caplog.text
    assert os.listdir(os.path.join(superseded(out), "checkpoints")) == ["step_000000008"]  # not picked again
    got = losses(out)
    assert sorted(got) == list(range(1, 11)) and all(got[s] == uninterrupted[s] for s in got)


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("change,named", [
    ("data.batch_size=16", "global batch (data.batch_size x ranks) 8 x 1 -> 16 x 1"),
    ("optim.name=sgd", "optim.name 'adamw' -> 'sgd'"),
    ("model.embed_dim=48", "model.embed_dim 32 -> 48"),
])
def test_resume_refuses_settings_that_cannot_continue(tiny_config, tmp_path, change, named):
    """Before: a changed batch size resumed silently, a changed optimiser crashed in torch
    (KeyError: 'momentum'), and even the failed resume rewrote config.yaml."""
    out = str(tmp_path / "run")
    train(tiny_config("run.max_steps=2", "run.checkpoint_every=2", output_dir=out))
    before = {n: open(os.path.join(out, n)).read() for n in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(ConfigError, match="run.resume: checkpoint .* was trained with other settings") as e:
        train(tiny_config("run.max_steps=4", change, output_dir=out))
    assert named in str(e.value) and "\n" not in str(e.value)
    assert {n: open(os.path.join(out, n)).read() for n in before} == before
    assert checkpoints(out) == ["step_000000002"] and not os.path.exists(os.path.join(out, "superseded"))


def test_resume_accepts_run_length_and_logging_changes(tiny_config, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    train(tiny_config("run.max_steps=4", "run.checkpoint_every=4", output_dir=out))
    train(tiny_config("run.max_steps=10", "run.log_every=2", "run.checkpoint_every=3", "run.keep_last=1",
                      "data.num_workers=1", output_dir=out))
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 6, 8, 10] and all(got[s] == uninterrupted[s] for s in (1, 2, 3, 4))
    assert "log_every: 2" in open(os.path.join(out, "config.yaml")).read()  # written once the run started


# ----------------------------------------------------------------------------- item 11


def test_a_crash_after_a_checkpoint_logs_each_step_once(tiny_config, uninterrupted, tmp_path, monkeypatch):
    """A crash at step 6 after the step-4 checkpoint; the resume logs steps 5 and 6 again. Before,
    metrics.jsonl held them twice; now the crashed run's records after step 4 are moved aside."""
    out = str(tmp_path / "run")
    real, calls = massl.objective.massl_loss, {"n": 0}

    def crash_at_step_6(*args, **kwargs):
        if args[0].is_meta:  # the FLOP count at the start of the run (massl/flops.py), not a step
            return real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("node failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(massl.objective, "massl_loss", crash_at_step_6)
    with pytest.raises(RuntimeError, match="node failure"):
        train(tiny_config("run.max_steps=10", "run.checkpoint_every=4", output_dir=out))
    monkeypatch.setattr(massl.objective, "massl_loss", real)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    train(tiny_config("run.max_steps=10", "run.checkpoint_every=4", output_dir=out))
    assert [r["step"] for r in records(out)] == list(range(1, 11))
    assert all(r["loss"] == uninterrupted[r["step"]] for r in records(out))
    assert [r["step"] for r in records(superseded(out))] == [5, 6]


def test_records_survive_a_sigkill(digits_dir, tmp_path):
    """metrics.jsonl and TensorBoard hold every record logged before a SIGKILL (TensorBoard's
    writer flushed every 2 minutes: a killed run lost up to 2 minutes of it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "massl.cli"] + tiny_overrides(os.path.join(digits_dir, "train"), out) + [
        "run.max_steps=400", "optim.epochs=50", "run.tensorboard=true"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = os.path.join(out, "metrics.jsonl")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 5):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    logged = [r["step"] for r in records(out)]
    assert len(logged) >= 5
    events = EventAccumulator(os.path.join(out, "tb"))
    events.Reload()
    in_tensorboard = [e.step for e in events.Scalars("train/loss")]
    assert set(logged) - set(in_tensorboard) <= {logged[-1]}  # at most the record being written

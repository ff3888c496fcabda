"""Starting a run in its output directory (checkpoint/resume.py) without training: which
checkpoint run.resume picks, which setting changes a resume refuses, and what start_history
moves aside (checkpoints of another history, later metrics records, other runs' outputs)."""
from __future__ import annotations

import json
import os

import pytest

from massl.checkpoint.manager import CheckpointManager
from massl.checkpoint.resume import (SUPERSEDED, check_config, checkpoint_to_resume, config_changes,
                                     start_history)
from massl.config import ConfigError, load_config
from tests.test_checkpoint_manager import parts


@pytest.fixture
def cfg(tmp_path):
    def make(*overrides):
        return load_config(None, [f"data.path={tmp_path}", f"run.output_dir={tmp_path / 'run'}", *overrides],
                           check_paths=False)
    return make


def save(ckpt: CheckpointManager, step: int, cfg, world: int = 1) -> str:
    return ckpt.save(step, parts(step), {"config": cfg.to_dict(), "world_size": world})


def test_checkpoint_to_resume(cfg, tmp_path):
    ckpt = CheckpointManager(str(tmp_path / "run"), keep_last=3)
    c = cfg()
    first, second = save(ckpt, 1, c), save(ckpt, 2, c)
    assert checkpoint_to_resume(cfg("run.resume=never"), ckpt) is None
    assert checkpoint_to_resume(cfg("run.resume=auto"), ckpt) == second
    assert checkpoint_to_resume(cfg(f"run.resume={first}"), ckpt) == first
    open(os.path.join(first, "engine", "model.bin"), "wb").write(b"x" * 100)
    with pytest.raises(ConfigError, match=r"^run.resume: checkpoint .*step_000000001 cannot be used: engine/model.bin"):
        checkpoint_to_resume(cfg(f"run.resume={first}"), ckpt)


def test_config_changes_name_what_a_resume_may_not_change(cfg):
    saved = cfg("optim.lr=0.001", "data.batch_size=8").to_dict()
    saved["optim"]["momentum_teacher"] = saved["optim"].pop("teacher_momentum")  # an older massl's name
    assert config_changes(saved, 2, cfg("optim.lr=0.001", "data.batch_size=16", "run.max_steps=9"), 1) == []
    assert config_changes(saved, 2, cfg("optim.lr=0.002", "data.batch_size=8", "optim.teacher_momentum=0.99"), 2) == [
        "optim.lr 0.001 -> 0.002", "optim.teacher_momentum 0.996 -> 0.99"]
    assert config_changes(saved, 2, cfg("optim.lr=0.001", "data.batch_size=8"), 1) == [
        "global batch (data.batch_size x ranks) 8 x 2 -> 8 x 1"]
    del saved["data"]["batch_size"], saved["optim"]["lr"]  # keys the checkpoint does not record are not compared
    assert config_changes(saved, 2, cfg("optim.lr=0.002", "data.batch_size=8"), 1) == []


def test_check_config(cfg, tmp_path):
    ckpt = CheckpointManager(str(tmp_path / "run"), keep_last=3)
    path = save(ckpt, 1, cfg("data.batch_size=8"), world=2)
    check_config(path, cfg("data.batch_size=16", "run.max_steps=5"), 1)
    with pytest.raises(ConfigError, match=r"trained with other settings: optim.epochs 400 -> 300, optim.lr .*; a "
                                          r"resume may change only"):
        check_config(path, cfg("data.batch_size=8", "optim.lr=0.5", "optim.epochs=300"), 2)
    manifest = os.path.join(path, "manifest.json")
    data = json.load(open(manifest))
    del data["world_size"]  # recorded since; one rank before
    json.dump(data, open(manifest, "w"))
    check_config(path, cfg("data.batch_size=8"), 1)
    with pytest.raises(ConfigError, match=r"8 x 1 -> 8 x 2"):
        check_config(path, cfg("data.batch_size=8"), 2)
    del data["config"]
    json.dump(data, open(manifest, "w"))
    check_config(path, cfg("optim.lr=0.5"), 4)  # no config recorded: nothing to compare


def metrics(run: str, steps, tail: str = "") -> None:
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)
        f.write(tail)


def aside_of(run: str) -> str:
    (stamp,) = os.listdir(os.path.join(run, SUPERSEDED))
    return os.path.join(run, SUPERSEDED, stamp)


def test_resuming_an_older_checkpoint_moves_the_newer_ones_and_their_records_aside(cfg, tmp_path, caplog):
    run = str(tmp_path / "run")
    old = CheckpointManager(run, keep_last=5)
    old.history = "h1"
    for step in (1, 2, 3):
        save(old, step, cfg())
    metrics(run, [1, 2, 3, 4], tail='{"step": 1, "lo')  # a line cut short by a crash
    ckpt = CheckpointManager(run, keep_last=5)
    start_history(run, ckpt, os.path.join(ckpt.root, "step_000000002"))
    assert ckpt.history == "h1"
    assert [s for s, _ in ckpt.step_dirs()] == [2, 1]
    assert open(os.path.join(ckpt.root, "latest")).read() == "step_000000002\n"
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    aside = aside_of(run)
    assert os.listdir(os.path.join(aside, "checkpoints")) == ["step_000000003"]
    assert open(os.path.join(aside, "metrics.jsonl")).read().splitlines() == [
        json.dumps({"step": 3, "loss": 1.0}), json.dumps({"step": 4, "loss": 1.0}), '{"step": 1, "lo']
    assert "resumes from step 2" in caplog.text and "1 checkpoint(s), 3 metrics record(s)" in caplog.text


def test_a_checkpoint_of_another_history_is_moved_aside(cfg, tmp_path):
    run = str(tmp_path / "run")
    ckpt = CheckpointManager(run, keep_last=5)
    ckpt.history = "h1"
    save(ckpt, 1, cfg())
    ckpt.history = "h2"
    save(ckpt, 2, cfg())
    save(ckpt, 3, cfg())
    metrics(run, [1, 2])
    start_history(run, ckpt, os.path.join(ckpt.root, "step_000000002"))
    assert ckpt.history == "h2" and [s for s, _ in ckpt.step_dirs()] == [2]
    assert sorted(os.listdir(os.path.join(aside_of(run), "checkpoints"))) == ["step_000000001", "step_000000003"]


def test_a_new_run_moves_everything_of_the_old_one_aside(cfg, tmp_path, caplog):
    run = str(tmp_path / "run")
    ckpt = CheckpointManager(run, keep_last=5)
    save(ckpt, 1, cfg())
    metrics(run, [1])
    os.makedirs(os.path.join(run, "tb"))
    start_history(run, ckpt, None)
    assert len(ckpt.history) == 12 and ckpt.step_dirs() == []
    assert not os.path.exists(os.path.join(ckpt.root, "latest"))
    assert sorted(os.listdir(aside_of(run))) == ["checkpoints", "metrics.jsonl", "tb"]
    assert "starts from scratch" in caplog.text and "metrics.jsonl, tb" in caplog.text


def test_nothing_to_move(cfg, tmp_path):
    run = str(tmp_path / "run")
    ckpt = CheckpointManager(run, keep_last=5)
    start_history(run, ckpt, None)
    other = CheckpointManager(str(tmp_path / "other"), keep_last=5)
    other.history = "h9"
    save(other, 7, cfg())
    save(ckpt, 2, cfg())
    metrics(run, [1, 2])
    start_history(run, ckpt, os.path.join(ckpt.root, "step_000000002"))
    assert not os.path.exists(os.path.join(run, SUPERSEDED))
    fresh = CheckpointManager(str(tmp_path / "fresh"), keep_last=5)
    start_history(str(tmp_path / "fresh"), fresh, os.path.join(other.root, "step_000000007"))  # resumes elsewhere
    assert fresh.history == "h9" and not os.path.exists(str(tmp_path / "fresh" / SUPERSEDED))


def test_a_new_run_moves_old_outputs_aside_without_checkpoints(cfg, tmp_path, monkeypatch):
    """Even with no checkpoint to move; twice in the same second goes to the same folder."""
    import time

    run = str(tmp_path / "run")
    fixed = time.gmtime(0)
    monkeypatch.setattr(time, "gmtime", lambda *a: fixed)
    for _ in range(2):
        ckpt = CheckpointManager(run, keep_last=5)
        metrics(run, [1])
        start_history(run, ckpt, None)
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
    assert os.listdir(os.path.join(run, SUPERSEDED)) == ["19700101T000000Z"]
    assert sorted(os.listdir(aside_of(run))) == ["checkpoints", "metrics.jsonl"]

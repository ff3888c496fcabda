"""CheckpointManager on its own (one process, parts that write known bytes): `latest` names a
complete, verified checkpoint after every save, also when the save fails half-way; what counts
as complete; pruning; and the checks of the history kept by resume.py."""
from __future__ import annotations

import json
import os

import pytest

import massl.checkpoint.manager as manager
from massl.checkpoint.manager import MANIFEST, CheckpointManager, is_complete, verify


class Part:
    """Writes `files` ({relative name: bytes}) into its folder; load() reads them back."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.loaded = files, None

    def save(self, directory: str) -> None:
        for rel, data in self.files.items():
            os.makedirs(os.path.dirname(os.path.join(directory, rel)) or directory, exist_ok=True)
            with open(os.path.join(directory, rel), "wb") as f:
                f.write(data)

    def load(self, directory: str) -> None:
        self.loaded = {rel: open(os.path.join(directory, rel), "rb").read() for rel in self.files}


class TmpCheck(Part):
    """Checks that it is written into the checkpoint's temporary folder."""

    def save(self, directory: str) -> None:
        assert os.path.basename(os.path.dirname(directory)).startswith(".tmp-step_"), directory
        super().save(directory)


def parts(step: int) -> dict:
    return {"engine": Part({"model.bin": bytes([step]) * 100, "sub/optim.bin": b"o" * step}),
            "trainer": TmpCheck({"state.json": json.dumps({"step": step}).encode()})}


def latest(ckpt: CheckpointManager) -> str:
    with open(os.path.join(ckpt.root, "latest")) as f:
        return os.path.join(ckpt.root, f.read().strip())


def assert_latest_is_sound(ckpt: CheckpointManager, step: int, newest: bool = True) -> None:
    """`latest` names step `step`'s checkpoint, which is complete, verified and holds that step
    (and, with `newest`, is the one a resume takes)."""
    path = latest(ckpt)
    assert os.path.basename(path) == f"step_{step:09d}"
    assert is_complete(path) == (True, "") and verify(path) == (True, "")
    loaded = parts(0)
    CheckpointManager.load(path, loaded)
    assert loaded["trainer"].loaded == {"state.json": json.dumps({"step": step}).encode()}
    if newest:
        assert ckpt.latest_verified() == path


def test_latest_names_the_newest_sealed_checkpoint_and_old_ones_are_pruned(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        final = ckpt.save(step, parts(step), {"world_size": 1})
        assert final == os.path.join(ckpt.root, f"step_{step:09d}")
        assert_latest_is_sound(ckpt, step)
    assert sorted(os.listdir(ckpt.root)) == ["latest", "step_000000002", "step_000000003"]
    manifest = json.load(open(os.path.join(ckpt.root, "step_000000003", MANIFEST)))
    assert manifest["step"] == 3 and manifest["parts"] == ["engine", "trainer"] and manifest["world_size"] == 1
    assert manifest["files"] == {"engine/model.bin": 100, "engine/sub/optim.bin": 3, "trainer/state.json": 11}
    assert manifest["version"] == manager.VERSION and set(manifest["sha256"]) == set(manifest["files"])


def _fail_once(monkeypatch, module, name, when):
    real = getattr(module, name)

    def failing(*args, **kwargs):
        if when(*args):
            raise OSError(f"injected: {name} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def disk_full(directory: str) -> None:
    raise OSError("injected: disk full")


@pytest.mark.parametrize("failure", ["rename", "directory sync", "file sync", "manifest write", "part save"])
def test_a_save_that_fails_half_way_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """Before: with `latest` written before the rename and the directory sync, a failure in
    either left `latest` naming a checkpoint that was never sealed."""
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    ckpt.save(1, parts(1), {})
    broken = parts(2)
    with monkeypatch.context() as m:
        if failure == "rename":
            _fail_once(m, os, "rename", lambda src, dst: "step_000000002" in dst)
        elif failure == "directory sync":
            _fail_once(m, manager, "fsync_path", lambda path: path == ckpt.root)
        elif failure == "file sync":
            _fail_once(m, manager, "fsync_path", lambda path: path.endswith("model.bin"))
        elif failure == "manifest write":
            _fail_once(m, manager, "write_json_atomic", lambda path, data: True)
        else:
            broken["trainer"].save = disk_full
        with pytest.raises(OSError, match="injected"):
            ckpt.save(2, broken, {})
    # after a failed directory sync the renamed step 2 is sealed and verified: a resume may take it
    renamed = failure == "directory sync"
    assert_latest_is_sound(ckpt, 1, newest=not renamed)
    assert [s for s, _ in ckpt.step_dirs()] == ([2, 1] if renamed else [1])
    left = os.listdir(ckpt.root)
    assert (".tmp-step_000000002" in left) == (not renamed)  # left for the next save to remove
    # the next save clears what the failed one left and seals normally
    ckpt.save(3, parts(3), {})
    assert_latest_is_sound(ckpt, 3)
    steps = ["step_000000001", "step_000000002", "step_000000003"] if renamed else ["step_000000001", "step_000000003"]
    assert sorted(os.listdir(ckpt.root)) == ["latest"] + steps


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    ckpt.save(4, parts(4), {})
    again = parts(4)
    again["engine"].files["model.bin"] = b"new"
    ckpt.save(4, again, {})
    assert open(os.path.join(ckpt.root, "step_000000004", "engine", "model.bin"), "rb").read() == b"new"
    assert_latest_is_sound(ckpt, 4)


def test_pruning_keeps_checkpoints_after_this_step(tmp_path):
    """keep_last counts checkpoints up to the step being saved; newer ones (another history moved
    aside by resume.py, in practice) are never pruned here."""
    ckpt = CheckpointManager(str(tmp_path), keep_last=1)
    ckpt.save(9, parts(9), {})
    ckpt.save(2, parts(2), {})
    ckpt.save(3, parts(3), {})
    assert [s for s, _ in ckpt.step_dirs()] == [9, 3]


@pytest.mark.parametrize("damage", ["missing manifest", "bad json", "missing file", "short file", "flipped byte"])
def test_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path, damage, caplog):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    ckpt.save(1, parts(1), {})
    newest = ckpt.save(2, parts(2), {})
    model = os.path.join(newest, "engine", "model.bin")
    if damage == "missing manifest":
        os.remove(os.path.join(newest, MANIFEST))
    elif damage == "bad json":
        open(os.path.join(newest, MANIFEST), "w").write("{")
    elif damage == "missing file":
        os.remove(model)
    elif damage == "short file":
        open(model, "wb").write(b"x")
    else:
        data = bytearray(open(model, "rb").read())
        data[50] ^= 1
        open(model, "wb").write(bytes(data))
    ok, reason = verify(newest)
    assert not ok and reason
    older = os.path.join(ckpt.root, "step_000000001")
    assert ckpt.latest_verified() == older
    assert newest in caplog.text
    # sizes only: a flipped byte is still "complete" (the tools check what they read)
    assert ckpt.latest_complete() == (newest if damage == "flipped byte" else older)
    assert is_complete(newest)[0] == (damage == "flipped byte")


def test_reasons_name_the_file(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    path = ckpt.save(1, parts(1), {})
    model = os.path.join(path, "engine", "model.bin")
    open(model, "wb").write(b"x")
    assert is_complete(path) == (False, "engine/model.bin has 1 bytes, manifest says 100")
    os.remove(model)
    assert is_complete(path) == (False, "engine/model.bin is missing")
    assert verify(path) == (False, "engine/model.bin is missing")
    ckpt.save(2, parts(2), {})
    path = os.path.join(ckpt.root, "step_000000002")
    for i, rel in enumerate(("engine/model.bin", "trainer/state.json")):
        if i == 1:
            assert verify(path) == (False, "engine/model.bin does not match the sha256 recorded when it was saved: "
                                           "the file is damaged")
        full = os.path.join(path, rel)
        data = open(full, "rb").read()
        open(full, "wb").write(bytes([data[0] ^ 1]) + data[1:])
    ok, reason = verify(path)
    assert not ok and reason.startswith("engine/model.bin does not match") and "(and 1 other file(s))" in reason


def test_no_checkpoint(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    assert ckpt.step_dirs() == [] and ckpt.latest_complete() is None and ckpt.latest_verified() is None
    os.makedirs(os.path.join(ckpt.root, "step_1"))  # not a checkpoint name
    os.makedirs(os.path.join(ckpt.root, ".tmp-step_000000005"))
    assert ckpt.step_dirs() == []
    assert CheckpointManager(str(tmp_path / "nowhere"), keep_last=1, is_main=False).step_dirs() == []


class StatePart(Part):
    """A part loaded from a state dict (what a version-1 checkpoint gives the memory and trainer)."""

    def load_state_dict(self, state) -> None:
        self.loaded = state


def test_a_version_1_checkpoint_loads_through_the_legacy_layout(tmp_path):
    """Written before the parts had folders: the engine reads the root, state.pt holds the rest."""
    import torch

    root = tmp_path / "step_000000003"
    root.mkdir()
    torch.save({"memory": {"ptr": 5}, "trainer": {"step": 3}}, root / "state.pt")
    (root / MANIFEST).write_text(json.dumps({"step": 3, "files": {"state.pt": (root / "state.pt").stat().st_size}}))
    engine, memory, trainer = Part({"state.pt": b""}), StatePart({}), StatePart({})
    CheckpointManager.load(str(root), {"engine": engine, "memory": memory, "trainer": trainer})
    assert engine.loaded == {"state.pt": (root / "state.pt").read_bytes()}  # read from the root
    assert memory.loaded == {"ptr": 5} and trainer.loaded == {"step": 3}
    assert is_complete(str(root)) == (True, "")


def test_a_manifest_without_a_file_list_is_complete(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"step": 1}))
    assert is_complete(str(tmp_path)) == (True, "")


def test_fallbacks_are_logged_by_both_lookups(tmp_path, caplog):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    ckpt.save(1, parts(1), {})
    newest = ckpt.save(2, parts(2), {})
    os.remove(os.path.join(newest, "engine", "model.bin"))
    caplog.clear()
    ckpt.latest_complete()
    assert f"checkpoint {newest} is incomplete (engine/model.bin is missing); falling back" in caplog.text
    caplog.clear()
    ckpt.latest_verified()
    assert f"checkpoint {newest} is incomplete or damaged (engine/model.bin is missing); falling back" in caplog.text


def test_lookups_and_saves_are_collective_over_the_managers_group(tmp_path, monkeypatch):
    """Every collective the manager makes goes to its group (one process: recorded, not reduced)."""
    group, seen = object(), set()

    def record(fn):
        def wrapped(*args):
            seen.add((fn.__name__, args[-1] is group))
            return fn(*args[:-1], None)
        return wrapped

    for name in ("barrier", "broadcast_object", "gather_objects"):
        monkeypatch.setattr(manager, name, record(getattr(manager, name)))
    monkeypatch.setattr(manager, "world_of", lambda g: (seen.add(("world_of", g is group)), (0, 1))[1])
    ckpt = CheckpointManager(str(tmp_path), keep_last=3, group=group)
    path = ckpt.save(1, parts(1), {})
    assert ckpt.latest_verified() == path
    assert seen == {("barrier", True), ("broadcast_object", True), ("gather_objects", True), ("world_of", True)}


def test_layout_history_and_size_only_checkpoints(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    assert ckpt.root == os.path.join(str(tmp_path), "checkpoints") and os.path.isdir(ckpt.root)
    assert CheckpointManager(str(tmp_path), keep_last=3).root == ckpt.root  # an existing folder is fine
    assert not os.path.exists(CheckpointManager(str(tmp_path / "other"), keep_last=3, is_main=False).root)
    ckpt.history = "abc"
    path = ckpt.save(1, parts(1), {"world_size": 2})
    manifest = json.load(open(os.path.join(path, MANIFEST)))
    assert manifest["history"] == "abc" and manifest["world_size"] == 2
    del manifest["sha256"]  # written before checksums: checked by size only
    open(os.path.join(path, MANIFEST), "w").write(json.dumps(manifest))
    assert verify(path) == (True, "")

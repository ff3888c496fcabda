"""Atomic checkpoints of named parts: keep-N, find the newest complete one, never trust a partial write.

Layout under <output_dir>/checkpoints/:
    step_000001000/          one checkpoint: manifest.json (written last) and one folder per part,
        engine/              written by its owner: the engine (models, optimiser, loss scaler),
        memory/              the memory bank, and the loop's trainer state (step, RNG states)
        trainer/
    .tmp-step_000001000/     a checkpoint being written (ignored, removed on the next save)
    latest                   text file naming the newest complete checkpoint, replaced atomically

A part is any object with `save(directory)` and `load(directory)`, both collective. A checkpoint
counts only if its directory was renamed from the temporary name (after every rank finished
writing and the files were fsynced) and every file listed in its manifest has the recorded
size; before a resume, also the sha256 recorded for each file at save time (the ranks share
the hashing). Anything else is skipped with a warning naming the file, in favour of an older
one. Checkpoints written before the parts had their own folders (manifest without "version")
load through legacy.py; those written before checksums are checked by size only.

The manifest also records the run's history (`history`: an id drawn when a run starts from
scratch, kept by its resumptions); resume.py keeps one history per run directory, so pruning
by step number only ever meets the current one's checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Mapping, Optional

from ..dist import barrier, broadcast_object, gather_objects, world_of
from ..fileio import fsync_path, sha256_file, write_json_atomic, write_text_atomic
from ..logging import log
from .part import CheckpointPart, SavedPart

MANIFEST = "manifest.json"
VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def _listing(directory: str) -> dict[str, int]:
    files = {}
    for dirpath, _, names in os.walk(directory):
        for n in names:
            if n == MANIFEST:
                continue
            full = os.path.join(dirpath, n)
            files[os.path.relpath(full, directory)] = os.path.getsize(full)
    return files


def checksums(directory: str, names: list[str], group=None) -> dict[str, str]:
    """sha256 of each file of `names` (relative to `directory`, the same list on every rank);
    collective: each rank hashes its share."""
    rank, world = world_of(group)
    mine = {n: sha256_file(os.path.join(directory, n))[0] for n in names[rank::world]}
    return {n: h for share in gather_objects(mine, group) for n, h in share.items()}


def read_checkpoint_manifest(directory: str) -> dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def is_complete(directory: str) -> tuple[bool, str]:
    """(ok, reason): the manifest exists and every listed file has its recorded size."""
    try:
        manifest = read_checkpoint_manifest(directory)
    except (OSError, ValueError) as e:
        return False, f"no readable {MANIFEST} ({e.__class__.__name__})"
    for rel, size in manifest.get("files", {}).items():
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            return False, f"{rel} is missing"
        if os.path.getsize(full) != size:
            return False, f"{rel} has {os.path.getsize(full)} bytes, manifest says {size}"
    return True, ""


def verify(directory: str, group=None) -> tuple[bool, str]:
    """(ok, reason): complete (is_complete), and every file has the sha256 recorded at save time
    (collective: each rank hashes its share; the main rank's view of the sizes decides for all)."""
    ok, reason = broadcast_object(is_complete(directory), group)
    if not ok:
        return ok, reason
    recorded = read_checkpoint_manifest(directory).get("sha256", {})
    names = sorted(recorded)
    got = checksums(directory, names, group)
    bad = [n for n in names if got[n] != recorded[n]]
    if bad:
        more = f" (and {len(bad) - 1} other file(s))" if len(bad) > 1 else ""
        return False, f"{bad[0]} does not match the sha256 recorded when it was saved{more}: the file is damaged"
    return True, ""


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int, is_main: bool = True, group=None):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last, self.is_main, self.group = keep_last, is_main, group
        self.history: Optional[str] = None  # recorded in each manifest; set when the run starts (resume.py)
        if is_main:
            os.makedirs(self.root, exist_ok=True)

    def step_dirs(self) -> list[tuple[int, str]]:
        """(step, path) of every finished checkpoint directory, newest first."""
        if not os.path.isdir(self.root):
            return []
        out = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            if m:
                out.append((int(m.group(1)), os.path.join(self.root, name)))
        return sorted(out, reverse=True)

    def latest_complete(self) -> Optional[str]:
        """The newest complete checkpoint (sizes only: the tools, which check what they read)."""
        for step, path in self.step_dirs():
            ok, reason = is_complete(path)
            if ok:
                return path
            log.warning(f"checkpoint {path} is incomplete ({reason}); falling back to an older one")
        return None

    def latest_verified(self) -> Optional[str]:
        """Collective: the newest checkpoint whose files all match their checksums (to resume)."""
        for step, path in broadcast_object(self.step_dirs(), self.group):
            ok, reason = verify(path, self.group)
            if ok:
                return path
            log.warning(f"checkpoint {path} is incomplete or damaged ({reason}); falling back to an older one")
        return None

    def save(self, step: int, parts: Mapping[str, SavedPart], meta: dict) -> str:
        """Collective: every rank calls each part's `save(tmp_dir/<name>)`; rank 0 seals, renames and prunes."""
        name = f"step_{step:09d}"
        tmp, final = os.path.join(self.root, ".tmp-" + name), os.path.join(self.root, name)
        if self.is_main:
            for stale in os.listdir(self.root):
                if stale.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            for part_name in parts:
                os.makedirs(os.path.join(tmp, part_name))
        barrier(self.group)
        for part_name, part in parts.items():
            part.save(os.path.join(tmp, part_name))
        barrier(self.group)
        files = broadcast_object(_listing(tmp) if self.is_main else None, self.group)
        digests = checksums(tmp, sorted(files), self.group)
        if self.is_main:
            for rel in files:
                fsync_path(os.path.join(tmp, rel))
            write_json_atomic(os.path.join(tmp, MANIFEST), {
                "version": VERSION, "step": step, "parts": list(parts), "files": files, "sha256": digests,
                "history": self.history, **meta})
            os.rename(tmp, final)
            fsync_path(self.root)
            write_text_atomic(os.path.join(self.root, "latest"), name + "\n")
            # keep_last of this history up to this step (resume.py moved any other history aside)
            for _, old in [(s, p) for s, p in self.step_dirs() if s <= step][self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.group)
        return final

    @staticmethod
    def load(directory: str, parts: Mapping[str, CheckpointPart]) -> None:
        """Collective: every part reads its folder of `directory` (any checkpoint version)."""
        manifest = read_checkpoint_manifest(directory)
        if manifest.get("version", 1) < VERSION:
            from .legacy import load_version_1

            load_version_1(directory, manifest, parts)
            return
        for part_name, part in parts.items():
            part.load(os.path.join(directory, part_name))

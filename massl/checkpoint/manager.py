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
size. Anything else is skipped with a warning in favour of an older one. Checkpoints written
before the parts had their own folders (manifest without "version") load through legacy.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Optional

from ..dist import barrier
from ..fileio import fsync_path, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{9})$")
log = logging.getLogger("massl")


def _listing(directory: str) -> dict[str, int]:
    files = {}
    for dirpath, _, names in os.walk(directory):
        for n in names:
            if n == MANIFEST:
                continue
            full = os.path.join(dirpath, n)
            files[os.path.relpath(full, directory)] = os.path.getsize(full)
    return files


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


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int, is_main: bool = True, group=None):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last, self.is_main, self.group = keep_last, is_main, group
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
        for step, path in self.step_dirs():
            ok, reason = is_complete(path)
            if ok:
                return path
            log.warning(f"warning: checkpoint {path} is incomplete ({reason}); falling back to an older one")
        return None

    def save(self, step: int, parts: dict, meta: dict) -> str:
        """Collective: every rank calls each part's `save(tmp_dir/<name>)`; rank 0 seals, renames and prunes."""
        name = f"step_{step:09d}"
        tmp, final = os.path.join(self.root, ".tmp-" + name), os.path.join(self.root, name)
        if self.is_main:
            for stale in os.listdir(self.root):
                if stale.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            for part in parts:
                os.makedirs(os.path.join(tmp, part))
        barrier(self.group)
        for part_name, part in parts.items():
            part.save(os.path.join(tmp, part_name))
        barrier(self.group)
        if self.is_main:
            files = _listing(tmp)
            for rel in files:
                fsync_path(os.path.join(tmp, rel))
            write_json_atomic(os.path.join(tmp, MANIFEST),
                              {"version": VERSION, "step": step, "parts": list(parts), "files": files, **meta})
            os.rename(tmp, final)
            fsync_path(self.root)
            write_text_atomic(os.path.join(self.root, "latest"), name + "\n")
            for _, old in self.step_dirs()[self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.group)
        return final

    @staticmethod
    def load(directory: str, parts: dict) -> None:
        """Collective: every part reads its folder of `directory` (any checkpoint version)."""
        manifest = read_checkpoint_manifest(directory)
        if manifest.get("version", 1) < VERSION:
            from .legacy import load_version_1

            load_version_1(directory, manifest, parts)
            return
        for part_name, part in parts.items():
            part.load(os.path.join(directory, part_name))

"""Checkpoints written before each part had its own folder (manifest without "version").

`torch` format: `state.pt` held the engine's entries (student, teacher, optimizer, scaler) beside
`memory` (the whole ring) and `trainer` (step, RNG states). `dcp` format: DCP files held the
engine's entries beside `memory.bank` / `memory.ptr`, and `trainer.pt` held `trainer`. The
engines read their own entries from the checkpoint root; the memory and the trainer state are
mapped here.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch


def load_version_1(directory: str, manifest: dict, parts: Mapping[str, Any]) -> None:
    parts["engine"].load(directory)
    if manifest.get("format", "torch") == "torch":
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        memory, trainer = state["memory"], state["trainer"]
    else:
        from ..engines.dcp_io import read_full_tensors

        entries = read_full_tensors(directory, "memory.")
        memory = {"bank": entries["bank"], "ptr": int(entries["ptr"]), "offset": 0, "size": entries["bank"].shape[1]}
        trainer = torch.load(os.path.join(directory, "trainer.pt"), map_location="cpu", weights_only=True)["trainer"]
    parts["memory"].load_state_dict(memory)
    parts["trainer"].load_state_dict(trainer)


def engine_directory(directory: str, manifest: dict) -> str:
    """Where the engine's files are: its own folder, or the root of a version-1 checkpoint."""
    return os.path.join(directory, "engine") if manifest.get("version", 1) >= 2 else directory

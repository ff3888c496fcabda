"""Engines: how student and teacher are parallelised. `build_engine` picks one by `engine.name`."""
from __future__ import annotations

from ..config import Config
from ..dist import DistEnv
from ..checkpoint import read_manifest
from .base import Engine

# checkpoint format (manifest "format") -> engine class that can read it
FORMATS = {Engine.checkpoint_format: Engine}


def build_engine(cfg: Config, env: DistEnv, student, teacher) -> Engine:
    name = cfg.engine.name
    if name == "single":
        return Engine(cfg, env, student, teacher)
    raise NotImplementedError(f"engine.name={name!r} is not available yet")


def load_teacher_state_dict(checkpoint_dir: str) -> dict:
    """Full teacher (backbone + head) state dict from any engine's checkpoint, on the CPU."""
    fmt = read_manifest(checkpoint_dir).get("format", "torch")
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint {checkpoint_dir} has unknown format {fmt!r}")
    return FORMATS[fmt].read_teacher_state_dict(checkpoint_dir)


__all__ = ["Engine", "build_engine", "load_teacher_state_dict"]

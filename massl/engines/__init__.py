"""Engines: how student and teacher are parallelised. `build_engine` picks one by `engine.name`."""
from __future__ import annotations

from ..checkpoint import read_manifest
from ..config import Config
from ..dist import DistEnv
from .base import Engine
from .ddp import DDPEngine
from .fsdp import FSDPEngine

ENGINES = {cls.name: cls for cls in (Engine, DDPEngine, FSDPEngine)}
# checkpoint format (manifest "format") -> engine class that can read it
FORMATS = {cls.checkpoint_format: cls for cls in (Engine, FSDPEngine)}


def build_engine(cfg: Config, env: DistEnv, student, teacher) -> Engine:
    name = cfg.engine.name
    if name not in ENGINES:
        raise NotImplementedError(f"engine.name={name!r} is not available yet; use one of {', '.join(ENGINES)}")
    return ENGINES[name](cfg, env, student, teacher)


def load_teacher_state_dict(checkpoint_dir: str) -> dict:
    """Full teacher (backbone + head) state dict from any engine's checkpoint, on the CPU."""
    fmt = read_manifest(checkpoint_dir).get("format", "torch")
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint {checkpoint_dir} has unknown format {fmt!r}")
    return FORMATS[fmt].read_teacher_state_dict(checkpoint_dir)


__all__ = ["Engine", "DDPEngine", "FSDPEngine", "build_engine", "load_teacher_state_dict"]

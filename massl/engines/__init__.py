"""Engines: how student and teacher are parallelised. `build_engine` picks one by `engine.name`."""
from __future__ import annotations

from ..config import Config
from ..dist import DistEnv
from .base import Engine


def build_engine(cfg: Config, env: DistEnv, student, teacher) -> Engine:
    name = cfg.engine.name
    if name == "single":
        return Engine(cfg, env, student, teacher)
    raise NotImplementedError(f"engine.name={name!r} is not available yet")


__all__ = ["Engine", "build_engine"]

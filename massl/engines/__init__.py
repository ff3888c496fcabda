"""Engines: how student and teacher are parallelised (base.py: the interface and its contracts).

Each engine is imported only when a run asks for it, and registers the reader of its checkpoint
format, with which the tools read a teacher without a process group.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from ..config import Config
from ..dist import DistEnv
from .base import Engine

# engine.name -> "module:class"
ENGINES = {
    "single": "massl.engines.torch_optim:SingleEngine",
    "ddp": "massl.engines.ddp:DDPEngine",
    "fsdp": "massl.engines.fsdp:FSDPEngine",
    "deepspeed": "massl.engines.deepspeed_engine.engine:DeepSpeedEngine",
}
# checkpoint format (manifest "format") -> "module:function" reading the full teacher state dict
# from the engine's checkpoint directory, on the CPU
TEACHER_READERS = {
    "torch": "massl.engines.torch_optim:read_teacher_state_dict",
    "dcp": "massl.engines.dcp_io:read_teacher_state_dict",
    "deepspeed": "massl.engines.deepspeed_engine.checkpoint:read_teacher_state_dict",
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ValueError(f"engine.name: {name!r} is not available; use one of {', '.join(ENGINES)}")
    return _load(ENGINES[name])


def build_engine(cfg: Config, env: DistEnv, student: nn.Module, teacher: nn.Module) -> Engine:
    return engine_class(cfg.engine.name)(cfg, env, student, teacher)


def build_engine_from(cfg: Config, env: DistEnv,
                      build_models: Callable[[Config], tuple[nn.Module, nn.Module]]) -> Engine:
    """The engine over the student and teacher `build_models(cfg)` returns, built inside the
    engine's `model_init` context (ZeRO-3: partitioned at construction)."""
    cls = engine_class(cfg.engine.name)
    with cls.model_init(cfg, env):
        student, teacher = build_models(cfg)
    return cls(cfg, env, student, teacher)


def read_teacher_state_dict(checkpoint_format: str, directory: str) -> dict:
    if checkpoint_format not in TEACHER_READERS:
        raise ValueError(f"checkpoint {directory}: unknown format {checkpoint_format!r}; this version of massl reads "
                         f"{', '.join(TEACHER_READERS)}")
    return _load(TEACHER_READERS[checkpoint_format])(directory)


__all__ = ["Engine", "ENGINES", "build_engine", "build_engine_from", "engine_class", "read_teacher_state_dict"]

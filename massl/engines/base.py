"""The engine interface: everything the training loop and the tools ask of an engine.

An engine decides how student and teacher are spread over the ranks: it owns their wrapping,
the precision, the optimiser, gradient clipping, the teacher EMA and the checkpoint files of
those (not of the memory bank or the loop's state: checkpoint.py saves each part by its owner).
The loop only calls the methods below and never asks which engine it has. A new engine
implements them directly (DeepSpeed), or subclasses the torch-optimizer template
(torch_optim.py: single, ddp, fsdp).

Contracts:
- `student(crops)` / `teacher(crops)` (`Embedder`): a list of crop batches -> [V, B, D]
  embeddings; the caller runs the teacher under `torch.no_grad()` and both under `autocast()`.
  They may be wrappers that are not modules (DeepSpeed's); `student_module` / `teacher_module`
  are the plain SSLNet modules underneath (attributes in every engine), for state dicts and hooks.
- `backward(loss)`: afterwards every rank's student gradient is the *average* over the
  data-parallel group of the ranks' gradients of their own `loss` (DDP semantics). A loss term
  that spans the global batch therefore carries a factor of the world size (massl/objective.py,
  `global_term_scale`).
- `step(lr, wd)`: clip, optimiser step with these hyper-parameters, zero the gradients. Returns
  a dict of device tensors (at least `grad_norm`, the norm before clipping); it never reads a
  value back to the host and synchronises only through collectives of the group.
- `step_applied()`: a host bool, whether the last `step` updated the student; False after a step
  that an overflow check skipped (DeepSpeed's fp16/bf16), and then the loop moves neither the
  teacher nor the memory. Engines that do not know it on the host without a sync return True.
- `update_teacher(teacher_momentum)`: teacher = m * teacher + (1 - m) * student on the fp32
  master weights, on each rank's local parameters or shards, with no host synchronisation.
- `teacher_backbone()`: a context manager giving the teacher's backbone as a module that maps
  images [B, 3, H, W] to features (under `torch.no_grad()`), in place, without a copy: the
  periodic k-NN of the training loop runs it on every rank (collective for a sharded teacher).
- `save(directory)` / `load(directory)`: collective on every rank; the engine's own state
  (models, optimiser, loss scaler) in files under `directory`, readable at another world size
  where the format allows. `checkpoint_format` names that format; `read_teacher_state_dict`
  of the format (registered in engines/__init__.py) reads the full teacher without a process
  group, for checkpoints older than `teacher_state_dict`.
- `teacher_state_dict()`: collective; the full teacher (backbone + head) state dict, unsharded,
  on the main rank (other ranks may get an empty dict). Every checkpoint also holds it as
  safetensors (checkpoint/teacher.py), the only file the tools read.
"""
from __future__ import annotations

import abc
import contextlib
from typing import ContextManager, Protocol

import torch
import torch.nn as nn

from ..config import Config
from ..dist import DistEnv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Embedder(Protocol):
    """What `Engine.student` and `Engine.teacher` are: V crop batches [B, 3, H, W] -> [V, B, D]."""

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor: ...


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA, fp32 elsewhere (config validation refused fp16 without CUDA)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> ContextManager[object]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class Engine(abc.ABC):
    name: str
    checkpoint_format: str
    precision: str
    student: Embedder
    teacher: Embedder
    student_module: nn.Module
    teacher_module: nn.Module

    @abc.abstractmethod
    def __init__(self, cfg: Config, env: DistEnv, student: nn.Module, teacher: nn.Module) -> None:
        """Wrap `student` and `teacher` (the teacher an exact copy) for this engine on `env`."""

    @classmethod
    def check_config(cls, cfg: Config, env: DistEnv) -> None:
        """Checks of the run's config that only this engine knows (ConfigError), cheap: the loop calls
        it right after config validation, before any data or model is built."""

    @classmethod
    def model_init(cls, cfg: Config, env: DistEnv) -> ContextManager[object]:
        """The context in which student and teacher are built for this engine (build_engine_from):
        none, or one that builds them already sharded (DeepSpeed ZeRO-3), with the same weights."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def autocast(self) -> ContextManager[object]: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self, lr: float, wd: float) -> dict[str, torch.Tensor]: ...

    def step_applied(self) -> bool:
        return True

    @abc.abstractmethod
    def update_teacher(self, teacher_momentum: float) -> None: ...

    def teacher_backbone(self) -> ContextManager[nn.Module]:
        """The teacher's backbone, in place; an engine that shards the teacher overrides this."""
        backbone = self.teacher_module.backbone
        assert isinstance(backbone, nn.Module)
        return contextlib.nullcontext(backbone)

    @abc.abstractmethod
    def teacher_state_dict(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def save(self, directory: str) -> None: ...

    @abc.abstractmethod
    def load(self, directory: str) -> None: ...

"""The template of engines built on a plain torch optimizer, and the `single` engine.

Construction, in one place and a fixed order: wrap student and teacher (wrapping.py:
synchronised BatchNorm, activation checkpointing, compile), then the subclass's `parallelize`,
then build the optimiser from the wrapped student's parameters (FSDP2 replaces them with
sharded ones) and, for fp16, the loss scaler. A step: unscale, clip, optimiser step, zero the
gradients; the teacher EMA is its own call. Subclasses choose the parallel wrapper and which
local tensors the optimiser, clipping and EMA see (whole parameters, or FSDP shards).

Checkpoint format `torch`: the main rank writes `state.pt` (student, teacher, optimiser,
scaler); models and optimiser are replicated, so one copy holds everything.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..config import Config
from ..dist import DistEnv
from ..optim import build_optimizer, clip_grads_, ema_update_, param_groups, set_hparams
from .base import Engine, autocast_context, resolve_precision
from .wrapping import wrap_models

STATE_FILE = "state.pt"


def read_teacher_state_dict(directory: str) -> dict:
    """The teacher's full state dict from a `torch`-format engine directory, on the CPU."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True, mmap=True)
    return state["teacher"]


class TorchOptimizerEngine(Engine):
    checkpoint_format = "torch"
    grad_group = None  # the group over which gradient shards are reduced for norms (FSDP)
    student: nn.Module
    teacher: nn.Module

    def __init__(self, cfg: Config, env: DistEnv, student: nn.Module, teacher: nn.Module):
        self.cfg, self.env = cfg, env
        self.precision = resolve_precision(cfg.run.precision, env.device)
        # Steps 1-3 of wrapping.py work in place; the parallel wrapper (DDP keeps the module as
        # `.module`, fully_shard returns it) goes around the plain modules, kept as *_module.
        self.student_module, self.teacher_module = wrap_models(student.to(env.device), teacher.to(env.device),
                                                               cfg.engine, env.group)
        self.student, self.teacher = self.parallelize(self.student_module, self.teacher_module)
        self.optimizer = build_optimizer(cfg.optim, param_groups(self.student))
        self.scaler = self.make_scaler() if self.precision == "fp16" else None

    # -- what subclasses choose ----------------------------------------------------------------
    def parallelize(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The parallel wrapper, last step of the wrapping (none for one process)."""
        return student, teacher

    def local_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """The tensors of `model`'s parameters this rank updates, in parameter order."""
        return list(model.parameters())

    def local_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.student.parameters() if p.grad is not None]

    def make_scaler(self):
        """fp16's loss scaler (gradients here are whole, or averaged by DDP: a local inf check suffices)."""
        return torch.amp.GradScaler("cuda")

    # -- the interface -------------------------------------------------------------------------
    def autocast(self):
        return autocast_context(self.precision, self.env.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, lr: float, wd: float) -> dict:
        set_hparams(self.optimizer, lr, wd)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        o = self.cfg.optim
        norm = clip_grads_(self.local_grads(), o.clip_grad, o.clip_mode, self.grad_group)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def update_teacher(self, teacher_momentum: float) -> None:
        ema_update_(self.local_tensors(self.teacher), self.local_tensors(self.student), teacher_momentum)

    def state_dict(self) -> dict:
        return {"student": self.student_module.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

    def teacher_state_dict(self) -> dict:
        return self.teacher.state_dict() if self.env.is_main else {}  # replicated: no collective

    def save(self, directory: str) -> None:
        if self.env.is_main:
            torch.save(self.state_dict(), os.path.join(directory, STATE_FILE))

    def load(self, directory: str) -> None:
        self.load_state_dict(torch.load(os.path.join(directory, STATE_FILE), map_location=self.env.device,
                                        weights_only=True))


class SingleEngine(TorchOptimizerEngine):
    """One process: the template as is."""

    name = "single"

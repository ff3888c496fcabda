"""The engine interface, implemented for one process (`single`).

An engine owns everything that depends on how the models are parallelised: wrapping (in one
place, in a fixed order, wrapping.py: synchronised BatchNorm, activation checkpointing, compile,
then the engine's `parallelize`), precision, the optimiser step with clipping, the teacher EMA, and checkpoint I/O. The training
loop only calls `student(crops)`, `teacher(crops)`, `autocast()`, `backward()`, `step()`,
`save()` and `load()`, and never asks which engine it has.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import read_manifest
from ..config import Config
from ..dist import DistEnv
from ..optim import build_optimizer, clip_grads_, ema_update_, param_groups, set_hparams
from .wrapping import wrap_models

STATE_FILE = "state.pt"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision: fp16 needs a CUDA device (it uses a grad scaler); use fp32 or bf16 on CPU")
    return precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def process_group(env: DistEnv) -> dist.ProcessGroup:
    """The run's group; for a parallel engine started as one plain process (no launcher), a
    one-rank group, so that DDP and FSDP also run (and can be benchmarked) at world size 1."""
    if env.group is not None:
        return env.group
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, device_id=env.device if env.device.type == "cuda" else None)
    return dist.group.WORLD


class Engine:
    name = "single"
    checkpoint_format = "torch"  # recorded in each checkpoint's manifest; see engines.load_teacher_state_dict

    def __init__(self, cfg: Config, env: DistEnv, student: nn.Module, teacher: nn.Module):
        self.cfg, self.env = cfg, env
        self.precision = resolve_precision(cfg.run.precision, env.device)
        self.student, self.teacher = self.wrap(student.to(env.device), teacher.to(env.device))
        fused = env.device.type == "cuda" and cfg.optim.name == "adamw"
        self.optimizer = build_optimizer(cfg.optim, param_groups(self.student), fused=fused)
        self.scaler = self.make_scaler() if self.precision == "fp16" else None

    # -- wrapping ------------------------------------------------------------------------------
    def wrap(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        return wrap_models(student, teacher, self.cfg.engine, self.env.group, self.parallelize)

    def parallelize(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The engine's parallel wrapper, last step of `wrap` (none for one process)."""
        return student, teacher

    def student_module(self) -> nn.Module:
        """The student without its parallel wrapper, for state dicts."""
        return self.student

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=DTYPES[self.precision])

    def make_scaler(self):
        """The loss scaler for fp16 (gradients here are whole, or averaged by DDP: a local inf check suffices)."""
        return torch.amp.GradScaler("cuda")

    # -- one step ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def student_params(self) -> list[torch.Tensor]:
        """Local tensors of the student's parameters, in the same order as teacher_params()."""
        return list(self.student.parameters())

    def teacher_params(self) -> list[torch.Tensor]:
        return list(self.teacher.parameters())

    def local_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.student.parameters() if p.grad is not None]

    grad_group = None  # group over which gradient shards are reduced for norms (FSDP)

    def clip(self) -> torch.Tensor:
        o = self.cfg.optim
        return clip_grads_(self.local_grads(), o.clip_grad, o.clip_mode, self.grad_group)

    def step(self, lr: float, wd: float, momentum: float) -> torch.Tensor:
        """Clip, optimiser step, zero grads, teacher EMA. Returns the gradient norm before clipping."""
        set_hparams(self.optimizer, lr, wd)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self.clip()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update_(self.teacher_params(), self.student_params(), momentum)
        return norm

    # -- checkpoints ---------------------------------------------------------------------------
    @staticmethod
    def read_teacher_state_dict(directory: str) -> dict:
        """The teacher's full state dict from a checkpoint of this format, without a process group."""
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        return state["teacher"]

    def save(self, directory: str, memory, trainer_state: dict) -> None:
        """Collective: write models, optimiser, the memory bank and `trainer_state` into `directory`.
        Models and optimiser are replicated, so the main rank writes them; the memory is saved
        whole (gathered when sharded), so any world size can load it."""
        memory_state = memory.full_state_dict()
        if not self.env.is_main:
            return
        state = {
            "memory": memory_state,
            "student": self.student_module().state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "trainer": trainer_state,
        }
        torch.save(state, os.path.join(directory, STATE_FILE))

    def check_format(self, directory: str) -> None:
        """Refuse, before reading anything, a checkpoint written by an engine of another format."""
        manifest = read_manifest(directory)
        fmt = manifest.get("format", "torch")
        if fmt != self.checkpoint_format:
            raise ValueError(
                f"run.resume: checkpoint {directory} was written by engine {manifest.get('engine', '?')!r} "
                f"(format {fmt!r}); engine.name={self.name} reads format {self.checkpoint_format!r}. Resume "
                f"with the engine that wrote it, or start fresh with run.resume=never or a new run.output_dir")

    def load(self, directory: str, memory) -> dict:
        """Restore models, optimiser and memory from `directory`; returns the trainer state saved with it."""
        self.check_format(directory)
        state = torch.load(os.path.join(directory, STATE_FILE), map_location=self.env.device, weights_only=True)
        memory.load_state_dict(state["memory"])
        self.student_module().load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        return state["trainer"]

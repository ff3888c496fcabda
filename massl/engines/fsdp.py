"""`fsdp`: student and teacher sharded with FSDP2 (`fully_shard`), identically.

Each transformer block is its own FSDP unit and the root holds the rest (embeddings, final norm,
head). Parameters are DTensors sharded on dim 0 over a 1-D mesh of all ranks; the optimiser,
gradient clipping and the teacher EMA work on the local shards only, so no rank ever holds a
full copy outside a block's forward. Checkpoints go through torch.distributed.checkpoint
(dcp_io.py, format `dcp`) and load at any world size.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import cast

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from ..dist import process_group
from . import dcp_io
from .base import DTYPES
from .torch_optim import TorchOptimizerEngine


def _reshard(module, args, output):
    # FSDP2 leaves the root unsharded after forward, expecting backward to follow; the teacher's
    # forward has none, and its EMA and checkpoints need the sharded DTensors back (an EMA or DCP save on them fails).
    module.reshard()


def _reshard_without_grad(module, args, output):
    # the student, when run for evaluation: no backward will follow a forward without grad, and
    # its blocks may be kept gathered after forward (engine.fsdp_reshard_after_forward)
    if not torch.is_grad_enabled():
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def local_shards(tensors) -> list[torch.Tensor]:
    """The local shard of each DTensor; refuses anything else (an unsharded root).

    The shard itself (`_local_tensor`, what `to_local()` returns a view of): the optimiser-side
    code runs without autograd, and a `to_local()` per parameter is one more dispatched op each
    (468 per ViT-S step for clipping and the EMA)."""
    out = []
    for t in tensors:
        if not isinstance(t, DTensor):
            raise RuntimeError("FSDP: expected sharded DTensor parameters/gradients, found a plain tensor "
                               "(a root module left unsharded after forward?)")
        out.append(t._local_tensor)
    return out


class FSDPEngine(TorchOptimizerEngine):
    name = "fsdp"
    checkpoint_format = dcp_io.FORMAT

    def __init__(self, cfg, env, student, teacher):
        self.group = process_group(env)
        self.mesh = DeviceMesh.from_group(self.group, env.device.type)
        super().__init__(cfg, env, student, teacher)

    def make_scaler(self) -> ShardedGradScaler:
        # an inf/nan in any rank's gradient shard must skip the step on every rank
        return ShardedGradScaler(self.env.device.type, process_group=self.group)

    @property
    def grad_group(self):
        return self.group

    def mp_policy(self) -> MixedPrecisionPolicy:
        """Low-precision parameters for compute with fp32 gradient reduction; fp32 keeps fp32."""
        if self.precision == "fp32":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=DTYPES[self.precision], reduce_dtype=torch.float32)

    def parallelize(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        # SSLNet returns a view of its output; the loop never modifies it in place, which is all
        # that FSDP2's warning about views is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPSSLNet\) returned a view tensor")
        policy = self.mp_policy()
        for model in (student, teacher):
            # The step runs the student twice (global, then local crops) before its backward: a
            # block kept gathered after its forward is all-gathered twice per step (first forward,
            # second backward) instead of four times. The teacher has no backward: it reshards.
            reshard = model is teacher or self.cfg.engine.fsdp_reshard_after_forward
            # an SSLNet's timm backbone (as wrapping._blocks)
            blocks = cast(nn.Sequential, cast(nn.Module, model.backbone).blocks)
            for block in blocks:
                fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(model, mesh=self.mesh, mp_policy=policy)
        teacher.register_forward_hook(_reshard)
        student.register_forward_hook(_reshard_without_grad)
        return student, teacher

    def autocast(self):
        # The mixed-precision policy casts parameters and inputs; autocast on top would re-cast per op.
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def teacher_backbone(self):
        # Called without the root's forward, whose hooks would gather the root's own parameters
        # (embeddings, final norm): gathered here, resharded after; each block still gathers and
        # frees its own parameters in its forward, so at most one block is held whole.
        self.teacher.unshard()
        try:
            yield self.teacher.backbone
        finally:
            self.teacher.reshard()

    def local_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        # the teacher is sharded exactly like the student: shard i of one pairs with shard i of the other
        return local_shards(model.parameters())

    def local_grads(self) -> list[torch.Tensor]:
        return local_shards(p.grad for p in self.student.parameters() if p.grad is not None)

    def teacher_state_dict(self) -> dict:
        return dcp_io.full_teacher_state_dict(self)

    def save(self, directory: str) -> None:
        dcp_io.save(self, directory)

    def load(self, directory: str) -> None:
        dcp_io.load(self, directory)

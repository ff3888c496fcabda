"""`ddp`: the student replicated with DistributedDataParallel (gradients averaged over ranks).

The teacher stays a plain module: it is never trained by gradients, and the EMA keeps every
replica identical because every rank applies it to the same averaged student. BatchNorm in the
heads is synchronised (wrapping.py), so its buffers stay identical too. Checkpoints are the
template's `torch` format, written by the main rank.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..dist import process_group
from .torch_optim import TorchOptimizerEngine


class DDPEngine(TorchOptimizerEngine):
    name = "ddp"

    def parallelize(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        device_ids = [self.env.device] if self.env.device.type == "cuda" else None
        # gradient_as_bucket_view: the gradients are views into DDP's communication buckets, so the
        # reducer writes each gradient (divided by W) once instead of copying it in and back out
        # after the all-reduce; also saves one gradient-sized buffer.
        return DistributedDataParallel(student, device_ids=device_ids, process_group=process_group(self.env),
                                       gradient_as_bucket_view=True), teacher

"""BatchNorm over the global batch of all ranks, on any device (torch's SyncBatchNorm is GPU-only).

The projection head's optional BatchNorm (method.md, "Networks") must see the statistics of the
global batch, or the result depends on the number of ranks. Two small all-reduces per layer
(sum and count, then the sum of squared deviations) give the exact global mean and biased
variance; their backward all-reduces the gradient, so each rank receives the gradient of the sum
of every rank's loss with respect to its own rows, as torch's SyncBatchNorm does. The engines'
gradient averaging then turns that sum into the mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..dist import all_reduce_with_grad, world_of


class SyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training-mode statistics span `group`; same parameters, buffers and keys."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 group: Optional[dist.ProcessGroup] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_of(self.group)[1] == 1:
            return super().forward(x)
        x32 = x.float()  # statistics in fp32 whatever the compute dtype
        count = x32.new_full((1,), x.shape[0])
        sums = all_reduce_with_grad(torch.cat([x32.sum(0), count]), self.group)
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x32 - mean
        var = all_reduce_with_grad((centred * centred).sum(0), self.group) / n
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """As nn.BatchNorm1d: exponential average (or cumulative with momentum None), unbiased variance."""
        # the buffers exist with track_running_stats, the only case that calls this
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, group: Optional[dist.ProcessGroup]) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` (in place) by a SyncBatchNorm1d over `group`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, group)
            state = child.state_dict()
            if state:
                sync.to(next(iter(state.values())).device)
            if any(hasattr(p, "ds_id") for p in child.parameters()):
                # partitioned by DeepSpeed ZeRO-3 at construction: the same parameters, not copies
                for pname, p in child.named_parameters(recurse=False):
                    setattr(sync, pname, p)
                state = {k: v for k, v in state.items() if k not in dict(child.named_parameters(recurse=False))}
                sync.load_state_dict(state, strict=False)
            else:
                sync.load_state_dict(state)
            sync.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, group)
    return module


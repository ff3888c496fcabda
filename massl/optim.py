"""Optimisers (AdamW, SGD, LARS), parameter groups, gradient clipping and the teacher EMA.

Clipping and EMA work on lists of *local* tensors (whole parameters, or FSDP shards with the
group to reduce over), with foreach kernels and without a host synchronisation.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import OptimConfig
from .dist import all_reduce_


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay only on parameters with 2+ dims, as the published code: biases and norms get
    none; the CLS token and position embedding ([1, n, d]) do decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:  # (a parameter ZeRO-3 partitioned at construction keeps its shape in ds_shape)
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017); 1-D parameters get neither
    weight decay nor the trust ratio, as in DINO's implementation."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(o: OptimConfig, groups: list[dict], fused: bool = True) -> torch.optim.Optimizer:
    """Learning rate and weight decay start at 0; the loop sets them from the schedules every step.

    AdamW is fused (CUDA and CPU): one kernel per parameter group, and its step counters live on
    the device. The foreach and single-tensor paths read every parameter's step counter back to
    the host (two `.item()` per parameter and step: 312 host syncs for a ViT-S/16 step)."""
    if o.name == "adamw":
        kw = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), weight_decay=0.0, **kw)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, weight_decay=0.0, foreach=True)
    return LARS(groups, lr=0.0, momentum=o.momentum)


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0


def grad_norms(grads: list[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """L2 norm of each gradient (accumulated and returned in fp32: a loss-scaled fp16 gradient's
    norm overflows fp16); with `group`, the grads are shards and the squares are summed across it."""
    sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square()
    return all_reduce_(sq, group).sqrt()


def clip_grads_(grads: list[torch.Tensor], max_norm: float, mode: str,
                group: Optional[dist.ProcessGroup] = None, grad_scale: float = 1.0) -> torch.Tensor:
    """Clip in place; returns the global gradient norm before clipping (a device scalar).

    per_param: each parameter's gradient scaled by min(1, max_norm / (norm + 1e-6)), as the
    published code does with one host sync per parameter; here one foreach kernel.
    global: all gradients scaled by min(1, max_norm / (total_norm + 1e-6)).
    `grad_scale`: the loss scale the gradients still carry (norms are taken without it).
    """
    if not grads:
        return torch.zeros(())
    norms = grad_norms(grads, group)
    if grad_scale != 1.0:
        norms = norms / grad_scale
    total = norms.square().sum().sqrt()
    if max_norm > 0:
        scale = (max_norm / ((norms if mode == "per_param" else total) + 1e-6)).clamp(max=1.0)
        if mode == "per_param":
            torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scale.unbind(), grads)])
        else:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, one foreach kernel."""
    torch._foreach_lerp_(list(teacher), list(student), 1.0 - momentum)

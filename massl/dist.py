"""Launcher environments, process groups and the collective helpers the loss and memory use."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


# torch >= 2.12 renamed the tensor collectives; keep working on older releases (the GPU image has 2.11).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Optional[dist.ProcessGroup] = None  # None when running in one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> Optional[int]:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return None


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun / DeepSpeed / Slurm variables and start the process group if there are several ranks.

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK; under `srun` without them
    we take SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (the published code left the world size unset).
    """
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device: cuda was requested but no CUDA device is visible; use run.device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    group = None
    if world > 1:
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                timeout=datetime.timedelta(minutes=int(os.environ.get("MASSL_DIST_TIMEOUT_MIN", "30"))),
                device_id=dev if use_cuda else None,
            )
        group = dist.group.WORLD
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, group=group)


def world_of(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, world size) within `group`; (0, 1) for None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-gather along dim 0 without autograd: [n, ...] -> [world * n, ...], rank-major."""
    rank, world = world_of(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_tensor(out, x, group=group)
    return out


def gather_rows_to_main(x: torch.Tensor, group: Optional[dist.ProcessGroup],
                        chunk_rows: int = 1 << 16) -> Optional[torch.Tensor]:
    """Every rank's rows, concatenated in rank order, on group rank 0 (None elsewhere); ranks may
    hold different numbers of rows. Padding exists only in transport, in chunks of `chunk_rows`
    rows so that a large feature matrix never sits on the device whole (NCCL sends from CUDA)."""
    rank, world = world_of(group)
    if world == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else x.device
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=device), group=group)
    counts = [int(c.item()) for c in counts]
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(counts), chunk_rows):
        rows = min(chunk_rows, max(counts) - start)
        piece = x.new_zeros((rows,) + tuple(x.shape[1:]), device=device)
        mine = x[start:start + rows]
        piece[:mine.shape[0]] = mine.to(device)
        received = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, received, group_dst=0, group=group)
        if rank == 0:
            for r in range(world):
                parts[r].append(received[r][:max(0, min(rows, counts[r] - start))].to(x.device))
    if rank != 0:
        return None
    return torch.cat([p for r in range(world) for p in parts[r]] or [x[:0]])


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for our rows.

    Written here rather than using torch.distributed.nn.functional.all_gather, whose backward
    gives wrong gradients when the incoming gradient is non-contiguous (pitfalls.md #1): we make
    it contiguous before the reduce-scatter. The sum is right because each rank's loss carries
    only its own part of the global loss' gradient (see loss.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, world = world_of(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        _reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_rows_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherRowsWithGrad.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    """Forward: all-reduce SUM. Backward: identity, or with `reduce_grad` an all-reduce SUM of the
    (contiguous) incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.reduce_grad = group, reduce_grad
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None, None


def sum_partials(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum per-rank partial losses: each rank then holds the global value while its gradient stays
    its own partial one, which the gather's backward (above) combines across ranks."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group, False)


def all_reduce_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum a tensor that every rank then uses in full (synchronised BatchNorm statistics): the
    gradient of each rank's copy is summed back over the ranks."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group, True)


def all_reduce_(x: torch.Tensor, group: Optional[dist.ProcessGroup], op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)

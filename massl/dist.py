"""Launcher environments, process groups and the collective helpers the loss and memory use.

A little over 300 lines: each launcher's variables and the rendezvous address (docs/multinode.md)
sit beside the collectives whose gradients the loss relies on; both are short and self-contained.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional, cast

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import UserError

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


def resolve_device(name: str, local_rank: int = 0, key: str = "run.device") -> torch.device:
    """`auto` -> this process's CUDA device when CUDA is visible, else the CPU; `key` names the
    setting in the error when CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda was requested but no CUDA device is visible; use cpu (or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# Where each launcher puts (rank, world size, local rank), in order of precedence: torchrun and the
# deepspeed launcher (and what init_distributed exports), Open MPI's mpirun (`deepspeed --launcher
# openmpi`), Slurm's srun (also `deepspeed --launcher slurm`), MPICH / Intel MPI (PMI). mpirun comes
# before srun: inside an sbatch allocation the processes of an mpirun inherit the batch shell's
# SLURM_PROCID=0 / SLURM_NTASKS, which are not theirs.
LAUNCHER_VARIABLES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def _launcher(environ) -> Optional[tuple[str, str, str]]:
    """The first entry of LAUNCHER_VARIABLES whose world size is set, or None (one process)."""
    return next((names for names in LAUNCHER_VARIABLES if environ.get(names[1], "") != ""), None)


def launcher_ranks(environ=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the first launcher whose world size is set; (0, 1, 0) alone."""
    environ = os.environ if environ is None else environ
    names = _launcher(environ)
    if names is None:
        return 0, 1, 0
    rank, world, local = names
    return int(environ.get(rank) or 0), int(environ[world]), int(environ.get(local) or 0)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],login1" -> "gpu07"."""
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if entry is None:
        raise UserError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}; set MASTER_ADDR to rank 0's host")
    # Each bracket group by its first element; "07-09" -> "07" keeps the zero padding.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry.group(0))


def rendezvous_address(environ=None) -> str:
    """Where rank 0's process group listens (MASTER_ADDR), found in this order of precedence:
    1. MASTER_ADDR: set by torchrun, DeepSpeed's launcher (pdsh and local runs), launch/deepspeed.sh
       (for every runner but Slurm's: the hostfile's first host), launch/slurm/train.sbatch, or you;
    2. ranks from srun: the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST);
    3. ranks from mpirun with every rank on one host, or a single process: 127.0.0.1.
    mpirun across hosts without MASTER_ADDR is an error: nothing in its environment names rank 0's host.
    """
    environ = os.environ if environ is None else environ
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    names = _launcher(environ)
    if names is not None and names[0] == "SLURM_PROCID":
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
        if nodelist:
            return first_host(nodelist)
    if names is not None and names[0] == "OMPI_COMM_WORLD_RANK":
        local_size = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "")
        if local_size and local_size != environ["OMPI_COMM_WORLD_SIZE"]:
            raise UserError("MASTER_ADDR: not set, and this mpirun's ranks run on several hosts; pass rank 0's "
                            "host to every rank (mpirun -x MASTER_ADDR=HOST, as launch/deepspeed.sh does)")
    return "127.0.0.1"


def init_distributed(device: str = "auto") -> DistEnv:
    """Start the process group if the launcher started several ranks (launcher_ranks), on this rank's device.

    The ranks are exported as RANK / WORLD_SIZE / LOCAL_RANK too, so that libraries that read only
    those (DeepSpeed) agree with us under srun or mpirun.
    """
    rank, world, local_rank = launcher_ranks()
    # The address from the launcher's own variables, before RANK/WORLD_SIZE are exported: from then
    # on srun's and mpirun's ranks look like torchrun's, whose MASTER_ADDR (or else 127.0.0.1) would
    # be taken, and a rank on another host would never reach rank 0.
    address = rendezvous_address() if world > 1 and not dist.is_initialized() else None
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    group = None
    if world > 1:
        if not dist.is_initialized():
            assert address is not None  # found above whenever the group was still to start
            os.environ["MASTER_ADDR"] = address
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                timeout=datetime.timedelta(minutes=int(os.environ.get("MASSL_DIST_TIMEOUT_MIN", "30"))),
                device_id=dev if use_cuda else None,
            )
        group = dist.group.WORLD
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, group=group)


def process_group(env: DistEnv) -> dist.ProcessGroup:
    """The run's group; for a parallel engine started as one plain process (no launcher), a
    one-rank group, so that DDP and FSDP also run (and can be benchmarked) at world size 1."""
    if env.group is not None:
        return env.group
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, device_id=env.device if env.device.type == "cuda" else None)
    return cast(dist.ProcessGroup, dist.group.WORLD)  # set once the default group exists


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
    gathered = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([x.shape[0]], device=device), group=group)
    counts = [int(c.item()) for c in gathered]
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(counts), chunk_rows):
        rows = min(chunk_rows, max(counts) - start)
        piece = x.new_zeros((rows,) + tuple(x.shape[1:]), device=device)
        mine = x[start:start + rows]
        piece[:mine.shape[0]] = mine.to(device)
        received = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, received, group_dst=0, group=group)
        if rank == 0:
            assert received is not None  # made on rank 0 above
            for r in range(world):
                parts[r].append(received[r][:max(0, min(rows, counts[r] - start))].to(x.device))
    if rank != 0:
        return None
    return torch.cat([p for r in range(world) for p in parts[r]] or [x[:0]])


def all_gather_into_(out: torch.Tensor, shard: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Every rank's equal-sized `shard`, rank-major, into the flat `out` (`shard` may be rank's own
    slice of `out`, as in DeepSpeed's post-step gather); a copy in one process."""
    if world_of(group)[1] == 1:
        if shard.data_ptr() != out.data_ptr():
            out.copy_(shard)
        return out
    _all_gather_tensor(out, shard, group=group)
    return out


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for our rows.

    Written here rather than using torch.distributed.nn.functional.all_gather, whose backward
    gives wrong gradients when the incoming gradient is non-contiguous (seen with gloo): we make
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


def broadcast_object(obj, group: Optional[dist.ProcessGroup]):
    """The group's first rank's `obj` (small, picklable) on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def gather_objects(obj, group: Optional[dist.ProcessGroup]) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def rank_hosts(group: Optional[dist.ProcessGroup]) -> list[str]:
    """Every rank's host name, in rank order, on every rank (collective)."""
    return gather_objects(socket.gethostname(), group)


def describe_hosts(hosts: list[str]) -> str:
    """"node1 (ranks 0-1), node2 (ranks 2-3)": where the ranks run, hosts in order of their first rank."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    def span(rs: list[int]) -> str:
        contiguous = rs == list(range(rs[0], rs[-1] + 1))
        return (f"{rs[0]}-{rs[-1]}" if contiguous else ",".join(map(str, rs))) if len(rs) > 1 else str(rs[0])
    return ", ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {span(rs)})" for h, rs in ranks.items())


"""The MaSSL memory (method.md steps 2 and 7): a FIFO ring of K unit-norm teacher embeddings.

The ring is global; with `sharded` each rank stores only the K/W contiguous slots
[offset, offset + K/W) and an enqueue writes the part of the global range that falls on them,
so the union of the shards always equals the single-process ring.

Checkpoint files (`save`/`load`, one part of a checkpoint): `slots_<first>_<count>.pt`, each a
run of the ring's slots with the pointer; sharded, every rank writes its own slots, replicated,
the main rank writes all K. A rank reads the files that overlap its slots, so a checkpoint loads
at any world size, sharded or replicated, and nothing is gathered to save it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import gather_rows, world_of


_SLOTS_FILE = re.compile(r"^slots_(\d{12})_(\d{12})\.pt$")


class MemoryBank:
    def __init__(self, dim: int, size: int, group: Optional[dist.ProcessGroup] = None,
                 sharded: bool = True, seed: int = 0, device: torch.device | str = "cpu"):
        rank, world = world_of(group)
        if not isinstance(sharded, bool):  # memory.sharded is a string setting: resolve it first (massl.scaling)
            raise TypeError(f"MemoryBank: sharded must be a bool, got {sharded!r}")
        if sharded and size % world:
            raise ValueError(f"memory.size ({size}) must be divisible by the world size ({world}) to shard it")
        self.dim, self.size, self.group = dim, size, group
        self.local_size = size // world if sharded else size
        self.offset = rank * self.local_size if sharded else 0
        self.ptr = 0  # global ring position; a host int, so enqueue never syncs with the device
        if torch.device(device).type == "meta":  # shapes only (the FLOP count, massl/flops.py)
            self.bank = torch.empty(dim, self.local_size, device=device)
            return
        # Random normal columns, normalised, from the run seed: identical for every world size.
        g = torch.Generator().manual_seed(seed)
        full = F.normalize(torch.randn(dim, size, generator=g, device="cpu"), dim=0)
        self.bank = full[:, self.offset:self.offset + self.local_size].contiguous().to(device)

    @property
    def sharded(self) -> bool:
        return self.local_size != self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write this rank's [B, D] keys (teacher view 1) and every other rank's, in rank order, at the pointer."""
        keys = gather_rows(keys.detach().float(), self.group)
        n = keys.shape[0]
        if self.size % n:
            raise ValueError(f"memory.size ({self.size}) must be a multiple of the global batch ({n})")
        start, stop = max(self.ptr, self.offset), min(self.ptr + n, self.offset + self.local_size)
        if start < stop:
            self.bank[:, start - self.offset:stop - self.offset] = keys[start - self.ptr:stop - self.ptr].T
        self.ptr = (self.ptr + n) % self.size

    def state_dict(self) -> dict[str, Any]:
        """This rank's slots with their global offset (a shard of the global [D, K] array)."""
        return {"bank": self.bank, "ptr": self.ptr, "offset": self.offset, "size": self.size}

    def full_state_dict(self) -> dict[str, Any]:
        """The whole [D, K] ring on every rank (collective when sharded)."""
        bank = self.bank
        if self.sharded:
            bank = gather_rows(self.bank.T.contiguous(), self.group).T.contiguous()
        return {"bank": bank, "ptr": self.ptr, "offset": 0, "size": self.size}

    def save(self, directory: str) -> None:
        if self.sharded or world_of(self.group)[0] == 0:
            name = f"slots_{self.offset:012d}_{self.local_size:012d}.pt"
            torch.save(self.state_dict(), os.path.join(directory, name))

    @torch.no_grad()
    def load(self, directory: str) -> None:
        covered = 0
        for name in sorted(os.listdir(directory)):
            m = _SLOTS_FILE.match(name)
            if m is None:
                continue
            first, count = int(m.group(1)), int(m.group(2))
            lo, hi = max(first, self.offset), min(first + count, self.offset + self.local_size)
            if lo < hi:
                state = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)
                self._check_shape(state["bank"].shape[0], state["size"])
                self.bank[:, lo - self.offset:hi - self.offset] = state["bank"][:, lo - first:hi - first]
                self.ptr = int(state["ptr"])
                covered += hi - lo
        if covered != self.local_size:
            raise ValueError(f"memory checkpoint {directory} covers {covered} of this rank's {self.local_size} slots")

    def _check_shape(self, dim: int, size: int) -> None:
        if (dim, size) != (self.dim, self.size):
            raise ValueError(f"checkpoint memory is {dim} x {size}, this run's is {self.dim} x {self.size} "
                             f"(model.head_bottleneck_dim x memory.size); use the checkpoint's values")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept the global array or a shard covering our slots, saved at any world size."""
        self._check_shape(state["bank"].shape[0], state["size"])
        lo = self.offset - state["offset"]
        if lo < 0 or lo + self.local_size > state["bank"].shape[1]:
            raise ValueError("checkpoint memory shard does not cover this rank's slots")
        self.bank.copy_(state["bank"][:, lo:lo + self.local_size])
        self.ptr = int(state["ptr"])

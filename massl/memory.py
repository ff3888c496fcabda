"""The MaSSL memory (method.md steps 2 and 7): a FIFO ring of K unit-norm teacher embeddings.

The ring is global; with `sharded` each rank stores only the K/W contiguous slots
[offset, offset + K/W) and an enqueue writes the part of the global range that falls on them,
so the union of the shards always equals the single-process ring.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import gather_rows, world_of


class MemoryBank:
    def __init__(self, dim: int, size: int, group: Optional[dist.ProcessGroup] = None,
                 sharded: bool = True, seed: int = 0, device: torch.device | str = "cpu"):
        rank, world = world_of(group)
        if sharded and size % world:
            raise ValueError(f"memory.size ({size}) must be divisible by the world size ({world}) to shard it")
        self.dim, self.size, self.group = dim, size, group
        self.local_size = size // world if sharded else size
        self.offset = rank * self.local_size if sharded else 0
        self.ptr = 0  # global ring position; a host int, so enqueue never syncs with the device
        # Random normal columns, normalised, from the run seed: identical for every world size.
        g = torch.Generator().manual_seed(seed)
        full = F.normalize(torch.randn(dim, size, generator=g), dim=0)
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

    def state_dict(self) -> dict:
        """This rank's slots with their global offset (a shard of the global [D, K] array)."""
        return {"bank": self.bank, "ptr": self.ptr, "offset": self.offset, "size": self.size}

    def full_state_dict(self) -> dict:
        """The whole [D, K] ring on every rank (collective when sharded)."""
        bank = self.bank
        if self.sharded:
            bank = gather_rows(self.bank.T.contiguous(), self.group).T.contiguous()
        return {"bank": bank, "ptr": self.ptr, "offset": 0, "size": self.size}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Accept the global array or a shard covering our slots, saved at any world size."""
        if state["size"] != self.size or state["bank"].shape[0] != self.dim:
            raise ValueError(f"checkpoint memory is {state['bank'].shape[0]} x {state['size']}, "
                             f"this run's is {self.dim} x {self.size} (memory.size / model.head_bottleneck_dim)")
        lo = self.offset - state["offset"]
        if lo < 0 or lo + self.local_size > state["bank"].shape[1]:
            raise ValueError("checkpoint memory shard does not cover this rank's slots")
        self.bank.copy_(state["bank"][:, lo:lo + self.local_size])
        self.ptr = int(state["ptr"])

"""Independent float64 references written from method.md with explicit loops (tiny inputs only)."""
from __future__ import annotations

import torch


def massl_loss_reference(zs, zt, memory, perm, partition_size, student_temp, teacher_temp):
    """method.md step 5 literally: loops over teacher view j, student view i != j, partition n
    (the samples b of a partition at once: one row each)."""
    V, B, _ = zs.shape
    n_parts = perm.numel() // partition_size
    pair_losses = []
    for j in range(2):
        for i in range(V):
            if i == j:
                continue
            total = 0.0
            for n in range(n_parts):
                slots = perm[n * partition_size:(n + 1) * partition_size]
                ls = zs[i] @ memory[:, slots] / student_temp  # [B, P]
                lt = zt[j].detach() @ memory[:, slots] / teacher_temp
                target = torch.exp(lt - torch.logsumexp(lt, 1, keepdim=True))
                total = total - (target * (ls - torch.logsumexp(ls, 1, keepdim=True))).sum()
            pair_losses.append(total / (n_parts * B))
    return sum(pair_losses) / len(pair_losses)


class FifoReference:
    """A FIFO ring of K columns: enqueue writes n keys at the pointer, which advances by n (mod K)."""

    def __init__(self, memory: torch.Tensor):
        self.memory = memory.clone()
        self.ptr = 0

    def enqueue(self, keys: torch.Tensor) -> None:
        for row in keys:
            self.memory[:, self.ptr] = row
            self.ptr = (self.ptr + 1) % self.memory.shape[1]

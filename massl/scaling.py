"""What one step of the memory-bank loss costs per rank, sharded or replicated, as formulas of the
shapes; and `memory.sharded: auto`, which picks the layout by them (docs/scaling.md).

Notation of docs/memory.md: W ranks, B images per rank, G = W*B, V crops per image, D embedding
size, K memory slots, P partition size, N = K // P. Floats are 4 bytes (the loss computes in fp32).

- Sharded (`memory.sharded: true`): each rank holds K/W slots and the loss spans the global batch:
  the student's embeddings are all-gathered (V*G*D) and their gradient reduce-scattered, the
  teacher's all-gathered (2*G*D), the per-(row, partition) sums all-reduced ((V+2)*G*N) and the
  cross term (a scalar); the enqueue all-gathers the keys (G*D). The traffic grows with G.
- Replicated (`false`, the published layout): each rank holds all K slots and the loss sees the
  local batch; only the enqueue's all-gather (G*D). The bank costs K*D per rank whatever W.

Either way a rank multiplies G*K/W = B*K (row, slot) pairs: the same loss FLOPs and the same
[rows, slots] buffers per rank. What differs is the bank (K*D/W vs K*D) against the gathered
embeddings and partition sums (G rows vs B rows). `tests/test_scaling.py` checks the collective
bytes and the loss FLOPs against gloo runs at W = 1, 2, 4.
"""
from __future__ import annotations

from dataclasses import dataclass

FLOAT = 4  # bytes: the loss and the memory are fp32


@dataclass(frozen=True)
class LossShape:
    world: int  # W
    batch: int  # B, images per rank
    views: int  # V = 2 + local crops
    dim: int  # D
    size: int  # K
    partition_size: int  # P

    @property
    def global_batch(self) -> int:
        return self.world * self.batch

    @property
    def parts(self) -> int:
        return self.size // self.partition_size

    @classmethod
    def of_run(cls, cfg, world_size: int) -> "LossShape":
        """The shapes of a run's config (massl.config.Config) at `world_size` ranks."""
        return cls(world_size, cfg.data.batch_size, 2 + cfg.data.local_crops_number, cfg.model.head_bottleneck_dim,
                   cfg.memory.size, cfg.memory.partition_size)

    def rows_and_slots(self, sharded: bool) -> tuple[int, int]:
        """(rows R, slots Kl) one rank multiplies: (G, K/W) sharded, (B, K) replicated."""
        return (self.global_batch, self.size // self.world) if sharded else (self.batch, self.size)


def collectives(s: LossShape, sharded: bool) -> list[tuple[str, int]]:
    """(kind, payload bytes) of every collective of one step's loss path and enqueue, in order
    (payload as tests/collectives.py counts it: the gathered output, the reduce-scatter's input,
    the all-reduced tensor). None in one process."""
    if s.world == 1:
        return []
    G, V, D = s.global_batch, s.views, s.dim
    keys = [("all_gather", G * D * FLOAT)]
    if not sharded:
        return keys
    return [("all_gather", G * V * D * FLOAT), ("all_gather", G * 2 * D * FLOAT),
            ("all_reduce", (V + 2) * G * s.parts * FLOAT), ("all_reduce", FLOAT),
            ("reduce_scatter", G * V * D * FLOAT)] + keys


def bytes_moved(s: LossShape, sharded: bool) -> float:
    """Bytes each rank sends (and receives) per step with ring collectives: (W-1)/W of the payload
    for an all-gather or reduce-scatter, 2(W-1)/W for an all-reduce."""
    ring = (s.world - 1) / s.world
    return sum(payload * ring * (2 if kind == "all_reduce" else 1) for kind, payload in collectives(s, sharded))


def memory_bytes(s: LossShape, sharded: bool) -> dict:
    """Per-rank bytes of the loss path by what holds them (docs/memory.md, unchunked)."""
    rows, slots = s.rows_and_slots(sharded)
    V, D = s.views, s.dim
    parts = {
        "bank": D * slots,
        # zs (gathered when sharded) and its gradient, zt and the pulled-back targets q
        "embeddings": (2 * V + 4) * rows * D,
        # per-(row, partition) sums and their reciprocals (with the unused-slot column)
        "partition_sums": 2 * (V + 2) * rows * (s.parts + 1),
        # the exponentials kept for the backward and the forward's temporaries: (V + 3) [rows, slots]
        "logits": (V + 3) * rows * slots,
    }
    parts = {k: v * FLOAT for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def loss_flops(s: LossShape, sharded: bool) -> int:
    """Matrix-product FLOPs of the loss per rank and step, forward and backward (as FlopCounterMode counts)."""
    rows, slots = s.rows_and_slots(sharded)
    V, D = s.views, s.dim
    forward = 2 * (V + 2) * rows * slots * (D + s.parts) + 2 * 2 * rows * slots * D
    backward = 2 * V * rows * slots * D
    return forward + backward


def crossover_world(batch: int, views: int, dim: int, size: int, partition_size: int) -> float:
    """The W at which the sharded layout's extra gathered rows cost as much memory as the bank it
    saves: K*D*(1 - 1/W) = (G - B) * ((2V+4)*D + 2*(V+2)*(N+1)) solves to W = K*D / (B * that)."""
    per_row = (2 * views + 4) * dim + 2 * (views + 2) * (size // partition_size + 1)
    return size * dim / (batch * per_row)


def choose_sharded(s: LossShape) -> bool:
    """`memory.sharded: auto`: shard when it takes less memory per rank than a full copy (below the
    crossover W) and K splits evenly over the ranks; at W = 1 the layouts are the same computation."""
    if s.world == 1 or s.size % s.world:
        return False
    return memory_bytes(s, True)["total"] < memory_bytes(s, False)["total"]


def resolve_sharded(setting: str, s: LossShape) -> bool:
    """The layout `memory.sharded` (auto | true | false) gives at these shapes."""
    if setting == "auto":
        return choose_sharded(s)
    return setting == "true"

"""Which samples of which shards each rank and worker reads in an epoch (pure arithmetic, no I/O).

An epoch is one sequence of sample slots: the shards in an order drawn from (seed, epoch),
each contributing its manifest count, followed by further passes with fresh orders (seed,
epoch, pass) when data.samples_per_epoch asks for more than the shards hold, and cut at
world x iters_per_epoch x batch slots. Rank r takes the r-th contiguous block of that
sequence; within a rank, DataLoader worker q owns the rank's batches j with j % workers == q
(the order in which the DataLoader hands batches out) and reads them as one contiguous part
of the rank's block. A worker shuffles its part in blocks of data.shuffle_buffer slots, with
a permutation drawn from (seed, epoch, rank, worker, block). Every position is therefore a
function of (seed, epoch, rank, worker, batch), which gives exact resumption mid-epoch and
equal batch counts per rank for any number of shards.
"""
from __future__ import annotations

import random
from typing import NamedTuple


class Piece(NamedTuple):
    shard: int  # index into the shard list
    start: int  # first sample within the shard
    stop: int  # one past the last sample within the shard
    position: int  # epoch slot of the first sample


def shard_order(num_shards: int, seed: int, epoch: int, pass_index: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(f"shards-{seed}-{epoch}-{pass_index}").shuffle(order)
    return order


def epoch_pieces(counts: list[int], seed: int, epoch: int, lo: int, hi: int) -> list[Piece]:
    """The epoch slots [lo, hi) as runs of consecutive samples of single shards."""
    per_pass = sum(counts)
    if per_pass <= 0:
        raise ValueError("the shards hold no samples")
    pieces = []
    for p in range(lo // per_pass, (hi - 1) // per_pass + 1 if hi > lo else 0):
        base = p * per_pass
        for s in shard_order(len(counts), seed, epoch, p):
            a, b = max(base, lo), min(base + counts[s], hi)
            if a < b:
                pieces.append(Piece(s, a - base, b - base, a))
            base += counts[s]
    return pieces


def worker_batches(iters: int, workers: int, worker: int) -> int:
    """How many of a rank's `iters` batches worker `worker` produces (j % workers == worker)."""
    return len(range(worker, iters, workers))


def worker_span(rank: int, worker: int, iters: int, workers: int, batch: int) -> tuple[int, int]:
    """Epoch slots [lo, hi) that `worker` of `rank` reads."""
    rank_lo = rank * iters * batch
    lo = rank_lo + batch * sum(worker_batches(iters, workers, q) for q in range(worker))
    return lo, lo + batch * worker_batches(iters, workers, worker)


def block_permutation(length: int, seed: int, epoch: int, rank: int, worker: int, block: int) -> list[int]:
    perm = list(range(length))
    random.Random(f"block-{seed}-{epoch}-{rank}-{worker}-{block}").shuffle(perm)
    return perm


def resume_point(start_batch: int, slot: int, workers: int) -> tuple[int, int]:
    """DataLoader worker `slot` of an epoch started at `start_batch` serves the rank batches
    start_batch + slot + k * workers: (logical worker, its first local batch)."""
    j = start_batch + slot
    return j % workers, j // workers

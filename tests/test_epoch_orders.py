"""Every epoch order the data sources draw (the image folder's sample order, the WebDataset shard
order and its shuffle-block permutations): a permutation, a new one each epoch, the same one for
the same (seed, epoch), and the plan arithmetic around them."""
from __future__ import annotations

import pytest

from massl.data.epoch_plan import (Piece, block_permutation, epoch_pieces, resume_point, shard_order,
                                   worker_batches, worker_span)
from massl.data.folder import EpochSampler


def folder_epoch(n: int, batch: int, world: int, seed: int, epoch: int, start: int = 0) -> list[list[int]]:
    """Each rank's indices of one epoch of the image folder."""
    out = []
    for rank in range(world):
        sampler = EpochSampler(n, batch, rank, world, seed)
        sampler.set_epoch(epoch, start)
        pairs = list(sampler)
        assert all(e == epoch for e, _ in pairs) and len(pairs) == len(sampler)
        out.append([i for _, i in pairs])
    return out


def test_folder_order_is_a_permutation_new_each_epoch_and_reproducible():
    n, batch, world = 24, 3, 2
    orders = []
    for epoch in range(4):
        ranks = folder_epoch(n, batch, world, seed=5, epoch=epoch)
        flat = sum(ranks, [])
        assert sorted(flat) == list(range(n))  # every image once
        assert folder_epoch(n, batch, world, seed=5, epoch=epoch) == ranks  # the same for the same (seed, epoch)
        orders.append(flat)
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert folder_epoch(n, batch, world, seed=6, epoch=0) != folder_epoch(n, batch, world, seed=5, epoch=0)


def test_folder_global_batches_do_not_depend_on_the_world_size():
    """Global batch k holds the same images on 1 or 3 ranks (rank r takes the r-th block of it)."""
    n, global_batch = 30, 6
    for world in (2, 3):
        ranks = folder_epoch(n, global_batch // world, world, seed=1, epoch=2)
        per_batch = [sorted(sum((r[k * (global_batch // world):(k + 1) * (global_batch // world)] for r in ranks), []))
                     for k in range(n // global_batch)]
        single = folder_epoch(n, global_batch, 1, seed=1, epoch=2)[0]
        assert per_batch == [sorted(single[k * global_batch:(k + 1) * global_batch]) for k in range(n // global_batch)]


def test_folder_drops_the_tail_and_resumes_mid_epoch():
    n, batch, world = 23, 2, 3  # 3 global batches of 6, 5 images left over
    sampler = EpochSampler(n, batch, 0, world, seed=0)
    assert sampler.iters_per_epoch == 3 and len(sampler) == 6
    ranks = folder_epoch(n, batch, world, seed=0, epoch=1)
    flat = sum(ranks, [])
    assert len(flat) == len(set(flat)) == 18 and set(flat) <= set(range(n))
    resumed = folder_epoch(n, batch, world, seed=0, epoch=1, start=2)
    assert resumed == [r[2 * batch:] for r in ranks]
    sampler.set_epoch(1, 2)
    assert len(sampler) == 2


@pytest.mark.parametrize("num_shards", [1, 2, 7])
def test_shard_order_is_a_permutation_new_each_epoch_and_pass_and_reproducible(num_shards):
    orders = {}
    for epoch in range(6):
        for p in range(2):
            order = shard_order(num_shards, 3, epoch, p)
            assert sorted(order) == list(range(num_shards))
            assert shard_order(num_shards, 3, epoch, p) == order
            orders[epoch, p] = tuple(order)
    if num_shards > 2:
        assert len({orders[e, 0] for e in range(6)}) == 6  # changes with the epoch
        assert all(orders[e, 0] != orders[e, 1] for e in range(6))  # and with the pass
        assert shard_order(num_shards, 4, 0, 0) != shard_order(num_shards, 3, 0, 0)  # and with the seed


def test_block_permutation_is_a_permutation_of_every_draw_and_reproducible():
    base = dict(seed=1, epoch=2, rank=0, worker=1, block=3)
    perm = block_permutation(10, **base)
    assert sorted(perm) == list(range(10)) and block_permutation(10, **base) == perm
    for key in base:  # each of (seed, epoch, rank, worker, block) draws another permutation
        other = block_permutation(10, **{**base, key: base[key] + 1})
        assert sorted(other) == list(range(10)) and other != perm, key
    assert block_permutation(1, **base) == [0] and block_permutation(0, **base) == []


def _slots(pieces: list[Piece], counts: list[int]) -> list[tuple[int, int]]:
    """(shard, sample) of each slot, checking that the pieces tile their slots in order."""
    out, position = [], pieces[0].position if pieces else 0
    for p in pieces:
        assert p.position == position and 0 <= p.start < p.stop <= counts[p.shard]
        out += [(p.shard, i) for i in range(p.start, p.stop)]
        position += p.stop - p.start
    return out


def test_epoch_pieces_follow_the_shard_order_pass_after_pass():
    counts = [3, 5, 2, 4]  # 14 per pass
    for epoch in range(3):
        slots = _slots(epoch_pieces(counts, 7, epoch, 0, 40), counts)
        assert len(slots) == 40
        for p in range(3):  # each pass reads the shards whole, in that pass's order
            expected = [(s, i) for s in shard_order(4, 7, epoch, p) for i in range(counts[s])]
            assert slots[14 * p:14 * (p + 1)] == expected[:len(slots[14 * p:14 * (p + 1)])]
        # any window is the same slice of the epoch
        for lo, hi in [(0, 1), (2, 9), (13, 15), (14, 28), (27, 40), (5, 5)]:
            assert _slots(epoch_pieces(counts, 7, epoch, lo, hi), counts) == slots[lo:hi]


def test_epoch_pieces_rejects_empty_shards():
    with pytest.raises(ValueError, match="^the shards hold no samples$"):
        epoch_pieces([0, 0], 0, 0, 0, 4)
    assert epoch_pieces([1], 0, 0, 0, 3) == [Piece(0, 0, 1, 0), Piece(0, 0, 1, 1), Piece(0, 0, 1, 2)]


@pytest.mark.parametrize("lo,hi,passes", [(72, 87, [5, 6]), (84, 97, [6]), (5, 5, []), (0, 14, [0])])
def test_epoch_pieces_draws_only_the_passes_its_window_touches(monkeypatch, lo, hi, passes):
    """A worker's window of a long epoch (many passes) costs the passes it reads, not the epoch."""
    import massl.data.epoch_plan as plan

    drawn = []
    real = plan.shard_order
    monkeypatch.setattr(plan, "shard_order", lambda n, seed, epoch, p: drawn.append(p) or real(n, seed, epoch, p))
    epoch_pieces([3, 5, 2, 4], 7, 1, lo, hi)  # 14 samples per pass
    assert drawn == passes


@pytest.mark.parametrize("iters,workers", [(7, 3), (6, 2), (2, 4), (5, 1)])
def test_worker_spans_tile_the_rank_blocks(iters, workers):
    batch, world = 4, 3
    covered = []
    for rank in range(world):
        assert sum(worker_batches(iters, workers, q) for q in range(workers)) == iters
        for q in range(workers):
            assert worker_batches(iters, workers, q) == len([j for j in range(iters) if j % workers == q])
            lo, hi = worker_span(rank, q, iters, workers, batch)
            covered += list(range(lo, hi))
    assert covered == list(range(world * iters * batch))  # contiguous, rank-major, worker order


def test_resume_point_serves_the_batches_in_order():
    workers = 3
    for start in range(7):
        for slot in range(workers):
            worker, first = resume_point(start, slot, workers)
            j = start + slot  # the rank batch this DataLoader slot serves first
            assert worker == j % workers and first == j // workers
            assert first * workers + worker == j

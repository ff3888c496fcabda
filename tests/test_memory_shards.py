"""The memory's shard arithmetic and checkpoint files in one process: each rank's MemoryBank of a
sharded ring is built with its (rank, world) and given the keys a gather would give it; the
union of the shards must be the single-process FIFO ring, and the slot files must load at any
world size, sharded or replicated."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import massl.memory
from massl.memory import MemoryBank
from tests.reference import FifoReference

DIM, SIZE = 3, 12


class FakeGroup:
    """Stands for rank `rank` of a `world`-rank process group (massl.memory's collectives patched)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world


def bank_of(monkeypatch, rank: int, world: int, sharded: bool = True, size: int = SIZE) -> MemoryBank:
    """Rank `rank`'s bank of a `world`-rank ring; its enqueue receives the already gathered keys."""
    monkeypatch.setattr(massl.memory, "world_of", lambda g: (g.rank, g.world) if isinstance(g, FakeGroup) else (0, 1))
    monkeypatch.setattr(massl.memory, "gather_rows", lambda x, g: x)
    return MemoryBank(DIM, size, group=FakeGroup(rank, world), sharded=sharded, seed=4)


def keys(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 6), (4, 3), (2, 12)])
def test_shards_hold_the_single_process_ring(monkeypatch, world, batch):
    banks = [bank_of(monkeypatch, r, world) for r in range(world)]
    ref = FifoReference(MemoryBank(DIM, SIZE, seed=4).bank)
    for b in banks:
        assert b.sharded and b.local_size == SIZE // world and b.offset == banks.index(b) * SIZE // world
    for step in range(5):  # wraps around the ring
        k = keys(batch, step)
        for b in banks:
            b.enqueue(k)
        ref.enqueue(k)
        assert torch.equal(torch.cat([b.bank for b in banks], dim=1), ref.memory)
        assert all(b.ptr == ref.ptr for b in banks)


def test_replicated_and_single_process_banks_are_whole(monkeypatch):
    whole = MemoryBank(DIM, SIZE, seed=4)
    replicated = bank_of(monkeypatch, 1, 2, sharded=False)
    assert not whole.sharded and not replicated.sharded
    assert replicated.offset == 0 and torch.equal(replicated.bank, whole.bank)
    assert whole.full_state_dict() == {"bank": whole.bank, "ptr": 0, "offset": 0, "size": SIZE}


def test_replicated_ring_is_saved_by_the_main_rank_only(monkeypatch, tmp_path):
    for rank in (1, 2):
        bank_of(monkeypatch, rank, 3, sharded=False).save(str(tmp_path))
    assert os.listdir(tmp_path) == []
    bank_of(monkeypatch, 0, 3, sharded=False).save(str(tmp_path))
    assert os.listdir(tmp_path) == [f"slots_{0:012d}_{SIZE:012d}.pt"]


def test_bad_sizes(monkeypatch):
    with pytest.raises(ValueError, match=r"memory.size \(12\) must be divisible by the world size \(5\)"):
        bank_of(monkeypatch, 0, 5)
    with pytest.raises(TypeError, match="sharded must be a bool"):
        MemoryBank(DIM, SIZE, sharded="auto")
    with pytest.raises(ValueError, match=r"multiple of the global batch \(5\)"):
        MemoryBank(DIM, SIZE).enqueue(keys(5, 0))


def saved_ring(monkeypatch, tmp_path, world: int, sharded: bool) -> tuple[str, torch.Tensor, int]:
    """A ring of `world` ranks after 3 enqueues of 4 keys, saved by each rank into one folder."""
    folder = tmp_path / f"saved_{world}_{sharded}"
    folder.mkdir()
    banks = [bank_of(monkeypatch, r, world, sharded) for r in range(world)]
    ref = FifoReference(MemoryBank(DIM, SIZE, seed=4).bank)
    for step in range(3):
        for b in banks:
            b.enqueue(keys(4, step))
        ref.enqueue(keys(4, step))
    for b in banks:
        b.save(str(folder))
    return str(folder), ref.memory, ref.ptr


@pytest.mark.parametrize("saved_world,sharded", [(1, False), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("load_world", [1, 2, 4])
def test_slot_files_load_at_any_world_size(monkeypatch, tmp_path, saved_world, sharded, load_world):
    folder, ring, ptr = saved_ring(monkeypatch, tmp_path, saved_world, sharded)
    expected_files = [f"slots_{r * SIZE // saved_world:012d}_{SIZE // saved_world:012d}.pt"
                      for r in range(saved_world)] if sharded else [f"slots_{0:012d}_{SIZE:012d}.pt"]
    assert sorted(os.listdir(folder)) == expected_files
    (tmp_path / folder / "notes.txt").write_text("not a slot file")
    for load_sharded in (True, False):
        banks = [bank_of(monkeypatch, r, load_world, load_sharded) for r in range(load_world)]
        for b in banks:
            b.load(folder)
            assert b.ptr == ptr
        if load_sharded:
            assert torch.equal(torch.cat([b.bank for b in banks], dim=1), ring)
        else:
            assert all(torch.equal(b.bank, ring) for b in banks)


def test_load_refuses_other_shapes_and_missing_slots(monkeypatch, tmp_path):
    folder, _, _ = saved_ring(monkeypatch, tmp_path, 2, True)
    with pytest.raises(ValueError, match=r"checkpoint memory is 3 x 12, this run's is 3 x 24"):
        MemoryBank(DIM, 24).load(folder)
    with pytest.raises(ValueError, match=r"checkpoint memory is 3 x 12, this run's is 4 x 12"):
        MemoryBank(4, SIZE).load(folder)
    os.remove(os.path.join(folder, f"slots_{6:012d}_{6:012d}.pt"))
    with pytest.raises(ValueError, match="covers 6 of this rank's 12 slots"):
        MemoryBank(DIM, SIZE).load(folder)
    bank_of(monkeypatch, 0, 2).load(folder)  # rank 0's half is still there


def test_load_state_dict_takes_a_covering_shard(monkeypatch):
    whole = MemoryBank(DIM, SIZE, seed=1)
    whole.enqueue(keys(4, 0))
    second = bank_of(monkeypatch, 1, 2)
    second.load_state_dict(whole.state_dict())
    assert torch.equal(second.bank, whole.bank[:, 6:]) and second.ptr == 4
    shard = {"bank": whole.bank[:, 6:], "ptr": 4, "offset": 6, "size": SIZE}
    fourth = bank_of(monkeypatch, 3, 4)
    fourth.load_state_dict(shard)
    assert torch.equal(fourth.bank, whole.bank[:, 9:])
    with pytest.raises(ValueError, match="does not cover"):
        bank_of(monkeypatch, 0, 2).load_state_dict(shard)
    with pytest.raises(ValueError, match="does not cover"):
        bank_of(monkeypatch, 1, 2).load_state_dict({**shard, "bank": whole.bank[:, 6:11]})
    with pytest.raises(ValueError, match="checkpoint memory is"):
        MemoryBank(DIM, 24).load_state_dict(whole.state_dict())


def test_full_state_dict_gathers_the_shards(monkeypatch):
    banks = [bank_of(monkeypatch, r, 3) for r in range(3)]
    for b in banks:
        b.enqueue(keys(4, 1))
    ring = torch.cat([b.bank for b in banks], dim=1)
    gathered = torch.cat([b.bank.T for b in banks])  # what the all-gather of the [K/W, D] shards returns
    def gather(x, g):  # each rank contributes its own [K/W, D] rows
        assert torch.equal(x, banks[g.rank].bank.T)
        return gathered

    monkeypatch.setattr(massl.memory, "gather_rows", gather)
    full = banks[1].full_state_dict()
    assert torch.equal(full["bank"], ring) and full["bank"].is_contiguous()
    assert (full["ptr"], full["offset"], full["size"]) == (4, 0, SIZE)


def test_defaults_and_device(monkeypatch):
    assert torch.equal(MemoryBank(DIM, SIZE).bank, MemoryBank(DIM, SIZE, seed=0).bank)
    monkeypatch.setattr(massl.memory, "world_of", lambda g: (g.rank, g.world) if isinstance(g, FakeGroup) else (0, 1))
    assert MemoryBank(DIM, SIZE, group=FakeGroup(0, 2)).sharded  # sharded unless told otherwise
    assert MemoryBank(DIM, SIZE, device="meta").bank.device.type == "meta"

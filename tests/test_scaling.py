"""The loss path's cost model (massl/scaling.py) against what gloo processes do, and
`memory.sharded: auto`.

At W = 1, 2 and 4, sharded and replicated, each rank runs one step of the loss path (the step's
permutation, massl_loss forward and backward, the enqueue) and counts every collective with its
payload (tests/collectives.py) and the matrix-product FLOPs (FlopCounterMode): both must equal the
formulas, as must the bank's size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from massl.config import ConfigError, config_from_dict, load_config
from massl.scaling import (LossShape, collectives, crossover_world, loss_flops, memory_bytes, resolve_sharded)
from tests.collectives import CollectiveCounter
from tests.distributed import run_ranks

B, V, D, K, P = 2, 4, 8, 64, 16


def _loss_steps(group, rank):
    """One loss-path step per layout on `group` (None: one process): its collectives, FLOPs, bank bytes."""
    from massl.loss import massl_loss, random_partition_perm
    from massl.memory import MemoryBank

    results = {}
    for sharded in (True, False):
        memory = MemoryBank(D, K, group=group, sharded=sharded, seed=0)
        g = torch.Generator().manual_seed(rank)
        zs = F.normalize(torch.randn(V, B, D, generator=g), dim=-1).requires_grad_()
        zt = F.normalize(torch.randn(2, B, D, generator=g), dim=-1)
        with CollectiveCounter() as counter, FlopCounterMode(display=False) as flops:
            perm = random_partition_perm(K, 0, 0, zs.device)
            massl_loss(zs, zt, memory.bank, perm, P, 0.1, 0.05, group=group if sharded else None).backward()
            memory.enqueue(zt[1])
        results[sharded] = (counter.calls, flops.get_total_flops(), memory.bank.numel() * memory.bank.element_size())
    return results


def _worlds_2_and_4(rank, world):
    """W = 4 on all the processes, W = 2 on a group of the first two."""
    pair = torch.distributed.new_group([0, 1])
    return {2: _loss_steps(pair, rank) if rank < 2 else None, 4: _loss_steps(torch.distributed.group.WORLD, rank)}


def test_bytes_flops_and_bank_match_the_formulas():
    by_world = {1: [_loss_steps(None, 0)]}
    four = run_ranks(_worlds_2_and_4, 4)
    by_world[2] = [r[2] for r in four[:2]]
    by_world[4] = [r[4] for r in four]
    for world, ranks in by_world.items():
        shape = LossShape(world, B, V, D, K, P)
        for rank, by_layout in enumerate(ranks):
            for sharded, (calls, flops, bank) in by_layout.items():
                what = (world, sharded, rank)
                assert calls == collectives(shape, sharded), what
                assert flops == loss_flops(shape, sharded), what
                assert bank == memory_bytes(shape, sharded)["bank"], what


def test_auto_shards_below_the_crossover():
    """Published ViT-B/16 shapes (B=32, V=12, D=256, K=131072, P=16384): the sharded layout's extra
    rows cost as much memory as the bank it saves at W* ~ 141; auto shards below, replicates above."""
    crossover = crossover_world(32, 12, 256, 131072, 16384)
    assert 140 < crossover < 142
    for world in (2, 8, 64, 128, 256, 1024, 4096):
        shape = LossShape(world, 32, 12, 256, 131072, 16384)
        below = world < crossover
        sharded, replicated = memory_bytes(shape, True)["total"], memory_bytes(shape, False)["total"]
        assert (sharded < replicated) == below, world
        assert resolve_sharded("auto", shape) == below, world
        assert resolve_sharded("true", shape) and not resolve_sharded("false", shape)
    assert not resolve_sharded("auto", LossShape(1, 32, 12, 256, 131072, 16384))  # one process: one copy
    assert not resolve_sharded("auto", LossShape(3, 32, 12, 256, 131072, 16384))  # K not divisible by W


def test_memory_sharded_setting():
    assert load_config(None, [], check_paths=False).memory.sharded == "auto"
    for old, new in ((True, "true"), (False, "false")):  # configs and checkpoints of earlier versions
        assert config_from_dict({"memory": {"sharded": old}}, check_paths=False).memory.sharded == new
    with pytest.raises(ConfigError, match="memory.sharded"):
        load_config(None, ["memory.sharded=sometimes"], check_paths=False)
    cfg = load_config(None, ["data.batch_size=32", "data.local_crops_number=10", "memory.sharded=auto"],
                      check_paths=False)
    assert LossShape.of_run(cfg, 8) == LossShape(8, 32, 12, 256, 131072, 16384)

"""fsdp keeps the student's blocks gathered from their first forward to their backward
(engine.fsdp_reshard_after_forward: false, the default): the same training, fewer all-gathers.

Two gloo ranks take three steps with each setting; the losses and the teacher must agree (the
same arithmetic, only the gathers differ), and the parameter all-gathers of one step are counted
(tests/collectives.py): each student block is gathered twice per step (its first forward call,
and the backward of the second call after the first backward resharded it) instead of four
times (each of the two forward calls, global and local crops, and each backward).
"""
from __future__ import annotations

import torch

from massl.dist import DistEnv
from tests.collectives import CollectiveCounter
from tests.distributed import run_ranks
from tests.test_host_sync import HPARAMS, tiny_config

DEPTH = 2


def _steps(rank, world):
    from massl.train import build_step, train_step

    env = DistEnv(rank=rank, world_size=world, device=torch.device("cpu"), group=torch.distributed.group.WORLD)
    results = {}
    for reshard in (True, False):
        cfg = tiny_config("fsdp", **{"engine.fsdp_reshard_after_forward": reshard})
        engine, objective = build_step(cfg, env)
        g = torch.Generator().manual_seed(rank)
        sizes = [cfg.data.global_crop_size] * 2 + [cfg.data.local_crop_size] * cfg.data.local_crops_number
        losses, gathers = [], []
        for step in range(3):
            crops = [torch.randn(cfg.data.batch_size, 3, s, s, generator=g) for s in sizes]
            with CollectiveCounter() as counter:
                losses.append(float(train_step(engine, objective, crops, step, HPARAMS)["loss"]))
            gathers.append(sum(1 for kind, _ in counter.calls if kind == "all_gather"))
        teacher = torch.cat([p.full_tensor().flatten() for p in engine.teacher.parameters()])
        results[reshard] = {"losses": losses, "gathers": gathers[-1], "teacher": teacher.numpy()}
    return results


def test_kept_student_blocks_are_gathered_half_as_often():
    results = run_ranks(_steps, 2)[0]
    kept, resharded = results[False], results[True]
    assert max(abs(a - b) for a, b in zip(kept["losses"], resharded["losses"])) <= 1e-6 * abs(kept["losses"][0])
    assert abs(kept["teacher"] - resharded["teacher"]).max() <= 1e-6
    assert resharded["gathers"] - kept["gathers"] == 2 * DEPTH, (resharded["gathers"], kept["gathers"])

"""The deepspeed engine at ZeRO-3 builds student and teacher already partitioned (zero.Init): the
modules it receives hold no whole parameter on any rank, their weights are those of a plain build
from the same seed (the ddp engine's), element for element, also with model.init_from, and weight
decay goes to the same parameters.

One pair of gloo processes (W=2, tiny ViT with a BatchNorm head) builds three runs: fp32, fp32 with
model.init_from, bf16.

Memory: in fp32 the optimiser's master partitions are the weights' own flat buffers (DeepSpeed
0.19.8 clones them under torch 2.14: a third fp32 copy of the student per rank) and its step reads
the gradients in DeepSpeed's gradient buffer (it would flatten them into a new tensor: a transient
copy of the whole gradient partition); one training step after the build checks both.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from massl.config import config_from_dict
from massl.dist import init_distributed
from massl.models import build_student_teacher
from massl.optim import param_groups
from tests.distributed import run_ranks
from tests.engines_common import tiny_config

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # two processes start DeepSpeed (about 20 s on two busy cores)


def _build(rank, world, cfg_dicts: list) -> list:
    """Per config: the parameters the engine received whole on this rank, the student gathered, the teacher."""
    from massl.engines.deepspeed_engine.engine import DeepSpeedEngine
    from massl.train import build_step

    received = {}
    original = DeepSpeedEngine.__init__

    def spy(self, cfg, env, student, teacher):
        received["whole"] = [n for n, p in [*student.named_parameters(), *teacher.named_parameters()] if p.numel()]
        original(self, cfg, env, student, teacher)

    DeepSpeedEngine.__init__ = spy
    results = []
    for cfg_dict in cfg_dicts:
        cfg = config_from_dict(cfg_dict)
        engine, objective = build_step(cfg, init_distributed(cfg.run.device))
        with engine.deepspeed.zero.GatheredParameters(list(engine.student_module.parameters())):
            student = {k: v.clone() for k, v in engine.student_module.state_dict().items()}
        results.append({"whole": received["whole"], "student": student, "teacher": engine.teacher_state_dict(),
                        "groups": [len(g) for g in engine.ds.optimizer.fp16_groups], **_one_step(engine, objective)})
    return results


def _one_step(engine, objective) -> dict:
    """Take one training step; where the optimiser's masters and the gradients it steps on live."""
    from massl.schedules import Hyper
    from massl.train import train_step

    opt = engine.ds.optimizer
    shared = [m.data_ptr() == w.data_ptr() for m, w in zip(opt.fp32_partitioned_groups_flat,
                                                             opt.fp16_partitioned_groups_flat)]
    buffer = opt.grad_partitions_flat_buffer.untyped_storage().data_ptr()
    seen = []
    inner = opt.optimizer.step

    def spy_step(*args, **kwargs):
        seen.extend(p.grad.untyped_storage().data_ptr() == buffer for g in opt.optimizer.param_groups
                    for p in g["params"] if p.grad is not None)
        return inner(*args, **kwargs)

    opt.optimizer.step = spy_step
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    train_step(engine, objective, crops, 0, Hyper(lr=0.1, wd=0.04, teacher_momentum=0.9, teacher_temp=0.04))
    return {"masters_shared": shared, "grads_in_buffer": seen}


def _plain(cfg_dict, seed: int) -> dict:
    return _plain_student(cfg_dict, seed).state_dict()


def _plain_student(cfg_dict, seed: int):
    torch.manual_seed(seed)
    return build_student_teacher(config_from_dict(cfg_dict))[0]


def test_zero3_builds_partitioned_models_with_the_plain_weights(tmp_path):
    seed_run = tiny_config(str(tmp_path), str(tmp_path / "seed"), "deepspeed", 2, engine={"zero_stage": 3})
    weights = str(tmp_path / "teacher.safetensors")  # a massl teacher file (backbone.*, head.*) of another seed
    save_file({k: v.contiguous() for k, v in _plain(seed_run, 1).items()}, weights)
    init_run = tiny_config(str(tmp_path), str(tmp_path / "init"), "deepspeed", 2, engine={"zero_stage": 3},
                           model={"init_from": weights})
    bf16_run = tiny_config(str(tmp_path), str(tmp_path / "bf16"), "deepspeed", 2, engine={"zero_stage": 3},
                           run={"precision": "bf16"})
    per_rank = run_ranks(_build, 2, [seed_run, init_run, bf16_run], timeout=900)
    # (name, the plain build's weights, the student's dtype: bf16 mode casts the weights, as DeepSpeed
    # casts a plain module; the teacher file holds the fp32 EMA accumulator)
    cases = [("seed", _plain(seed_run, 0), torch.float32), ("init_from", _plain(seed_run, 1), torch.float32),
             ("bf16", _plain(seed_run, 0), torch.bfloat16)]
    for i, (what, expected, dtype) in enumerate(cases):
        got = per_rank[0][i]
        for rank in range(2):
            assert per_rank[rank][i]["whole"] == [], (what, rank)
        # weight decay on the parameters of 2+ dims only, as in a plain build (a partitioned one has no dims)
        assert got["groups"] == [len(g["params"]) for g in param_groups(_plain_student(seed_run, 0))], what
        params = {k for k in expected if "running" not in k and "num_batches" not in k}
        assert got["student"].keys() == expected.keys(), what
        for k in params:
            assert torch.equal(got["student"][k], expected[k].to(dtype)), (what, "student", k)
            assert torch.equal(got["teacher"][k], expected[k]), (what, "teacher", k)
        # the step stepped on DeepSpeed's gradient buffer, every precision; in fp32 no master copy
        assert got["grads_in_buffer"] and all(got["grads_in_buffer"]), (what, got["grads_in_buffer"])
        assert all(got["masters_shared"]) == (dtype == torch.float32), (what, got["masters_shared"])

"""Engines through the real training loop on gloo CPU processes (tiny ViT, fp32, SGD, BatchNorm head).

One set of runs (single W=1 with and without activation checkpointing, ddp W=2, fsdp W=2 with
full checkpointing) is shared by the tests of this module:
- the four give the same losses step by step and the same teacher weights;
- the fsdp W=2 checkpoint, resumed at W=1 and W=4, gives the W=2 teacher's features and memory,
  and training on gives the W=2 run's next loss; sharded gradient clipping at W=4 matches a
  single-process reference;
- its teacher, exported offline, loads strictly into timm with the sharded teacher's features;
- the ddp checkpoint resumes in the single engine and gives the single run's next loss.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch

from massl.config import ConfigError, config_from_dict
from massl.checkpoint.reader import read_teacher_state_dict
from massl.models import backbone_spec, build_student_teacher
from massl.optim import clip_grads_
from massl.train import train
from tests.distributed import run_ranks
from tests.engines_common import (assert_resumed_like, build_and_load, clip_error, losses, resume_elsewhere, step_dir,
                                  teacher_features, tiny_config, write_images)

RTOL = 1e-5  # losses of the engines differ by ~1e-6 relative here (reduction order): 10x margin
# Teacher weights differ by ~6e-7 absolute here, and moved by more than 1e-3: a wrong gradient
# average or EMA shows far above ATOL, rounding on another machine stays below it.
ATOL = 1e-5
FEATURE_TOL = 1e-5  # the same weights in other layouts or thread counts: rounding only


def _train(rank, world, cfg_dict):
    train(config_from_dict(cfg_dict))


def _fsdp_train_then_features(rank, world, cfg_dict, checkpoint, images):
    train(config_from_dict(cfg_dict))
    return teacher_features(*build_and_load(cfg_dict, checkpoint), images)


def _clip_error(engine, images, mode: str) -> float:
    """The fsdp engine's clipping of its local shards against the full gradients clipped in float64."""
    engine.student.train()
    engine.optimizer.zero_grad(set_to_none=True)
    engine.student([images, images.flip(-1)]).square().sum().backward()
    error = clip_error(mode, lambda: [p.grad.full_tensor() for p in engine.student.parameters()],
                       lambda max_norm: clip_grads_(engine.local_grads(), max_norm, mode, engine.grad_group))
    engine.optimizer.zero_grad(set_to_none=True)
    return error


@pytest.fixture(scope="module")
def runs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("engines")
    data = write_images(str(root / "images"))
    out = {name: str(root / name) for name in ("single", "single_ac", "ddp", "fsdp")}
    threads = torch.get_num_threads()
    try:
        train(config_from_dict(tiny_config(data, out["single"])))
        train(config_from_dict(tiny_config(data, out["single_ac"], engine={"activation_checkpointing": "every_k",
                                                                             "ac_every": 2})))
    finally:
        torch.set_num_threads(threads)
    run_ranks(_train, 2, tiny_config(data, out["ddp"], "ddp", 2))
    fsdp_cfg = tiny_config(data, out["fsdp"], "fsdp", 2, engine={"activation_checkpointing": "full"})
    features = run_ranks(_fsdp_train_then_features, 2, fsdp_cfg, step_dir(out["fsdp"], 4), images)[0]
    return {"data": data, "root": root, "out": out, "fsdp_cfg": fsdp_cfg, "fsdp_features": features}


def _assert_losses_match(got: dict, ref: dict, steps, rtol=RTOL):
    for s in steps:
        assert abs(got[s] - ref[s]) <= rtol * abs(ref[s]), f"step {s}: {got[s]} vs {ref[s]}"


def test_engines_give_the_same_losses_and_teacher(runs):
    out = runs["out"]
    ref = losses(out["single"])
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert abs(ref[5] - ref[1]) > 100 * RTOL * ref[1]  # the run moves: agreement is not trivial
    for name in ("single_ac", "ddp", "fsdp"):
        _assert_losses_match(losses(out[name]), ref, range(1, 6))

    teachers = {name: read_teacher_state_dict(step_dir(out[name], 5)) for name in ("single", "ddp", "fsdp")}
    torch.manual_seed(0)  # the runs' seed: their initial teacher
    initial = build_student_teacher(config_from_dict(tiny_config(runs["data"], "unused")))[1].state_dict()
    moved = max(float((teachers["single"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3, "the teacher did not move: comparing teachers would be trivial"
    for name in ("ddp", "fsdp"):
        assert sorted(teachers[name]) == sorted(teachers["single"])
        for key, ref_t in teachers["single"].items():
            torch.testing.assert_close(teachers[name][key], ref_t, rtol=RTOL, atol=ATOL, msg=f"{name} teacher {key}")


@pytest.mark.parametrize("world", [1, 4])
def test_fsdp_checkpoint_resumes_at_another_world_size(runs, images, world):
    cfg = tiny_config(runs["data"], str(runs["root"] / f"fsdp_w{world}"), "fsdp", world,
                      run={"resume": step_dir(runs["out"]["fsdp"], 4)})
    got = run_ranks(resume_elsewhere, world, cfg, step_dir(runs["out"]["fsdp"], 4), images, _clip_error,
                    ("per_param", "global"))[0]
    ref = runs["fsdp_features"]
    assert_resumed_like(got, ref, world, "sharded gradients", FEATURE_TOL)
    resumed = losses(cfg["run"]["output_dir"])
    assert sorted(resumed) == [5]
    _assert_losses_match(resumed, losses(runs["out"]["fsdp"]), [5])


def test_exported_fsdp_teacher_loads_strictly_into_timm(runs, images):
    state = read_teacher_state_dict(step_dir(runs["out"]["fsdp"], 4))
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    cfg = config_from_dict(runs["fsdp_cfg"])
    spec = backbone_spec(cfg.model, cfg.data.global_crop_size)
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(backbone, strict=True)
    with torch.no_grad():
        feats = model.eval()(images)
    np.testing.assert_allclose(feats.numpy(), runs["fsdp_features"]["backbone"], rtol=FEATURE_TOL, atol=FEATURE_TOL)


def test_ddp_checkpoint_resumes_in_one_process(runs):
    """The ddp format is the single engine's: it resumes at W=1 (memory gathered whole, derived RNG)."""
    out = str(runs["root"] / "ddp_to_single")
    cfg = tiny_config(runs["data"], out, run={"resume": step_dir(runs["out"]["ddp"], 4)})
    threads = torch.get_num_threads()
    try:
        train(config_from_dict(cfg))
    finally:
        torch.set_num_threads(threads)
    assert sorted(losses(out)) == [5]
    _assert_losses_match(losses(out), losses(runs["out"]["single"]), [5])


def test_resume_refuses_a_checkpoint_of_another_format(runs):
    cfg = tiny_config(runs["data"], str(runs["root"] / "wrong_format"), run={"resume": step_dir(runs["out"]["fsdp"], 4)})
    with pytest.raises(ConfigError, match="run.resume: .*format 'dcp'"):
        train(config_from_dict(cfg))
    assert os.path.isdir(step_dir(runs["out"]["fsdp"], 4))

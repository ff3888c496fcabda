"""The deepspeed engine (ZeRO 1, 2, 3) through the real training loop on gloo CPU processes.

One pair of processes (W=2) trains, one after the other, ddp and ZeRO 1, 2, 3 with per-parameter
clipping, the same with global clipping, and ZeRO-3 with activation checkpointing (tiny ViT,
fp32, SGD, BatchNorm head, clipping active at every step; two runs with the example
configs/deepspeed/zero{2,3}.json); another pair trains ZeRO-2 and ZeRO-3 with AdamW (checkpoint
at step 4, three steps more). The tests of this module share them:
- every ZeRO stage gives ddp's losses step by step and ddp's teacher weights, in both clip modes,
  and ZeRO-3 gives the same losses with and without activation checkpointing;
- the ZeRO-2 and ZeRO-3 W=2 AdamW checkpoints resume at W=1 and W=4 (DeepSpeed's universal
  conversion; one set of processes per world size); ZeRO-3's with the W=2 teacher's features and
  memory; every step after the resume gives the W=2 run's loss; at W=4 (parameters split
  unevenly) the engine's clipping of the gradient fragments matches clipping the full gradients
  in float64;
- the ZeRO-3 teacher, read without a process group, loads strictly into timm with its features;
- an SGD checkpoint (its momentum is not in DeepSpeed's universal format) at another world size
  is refused with what to do.
A separate one-rank process checks that a step DeepSpeed skips (non-finite gradient; bf16 ZeRO-1
and ZeRO-2, fp32 ZeRO-3) is counted and moves neither student, teacher nor memory.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from safetensors.torch import load_file

from massl.checkpoint.reader import read_teacher_state_dict
from massl.config import ConfigError, config_from_dict
from massl.dist import init_distributed
from massl.export import export_teacher
from massl.models import build_student_teacher
from massl.optim import clip_grads_
from massl.schedules import Hyper
from massl.train import build_step, train, train_step
from tests.distributed import run_ranks
from tests.engines_common import (assert_resumed_like, build_and_load, clip_error, losses, resume_elsewhere, step_dir,
                                  teacher_features, tiny_config, write_images)

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # as tests/test_engines_distributed.py: losses differ by ~1e-6 relative (reduction order)
ATOL = 1e-5  # teacher weights: moved by more than 1e-3, differ by rounding only
FEATURE_TOL = 1e-5
STAGES = (1, 2, 3)
MODES = ("per_param", "global")
ADAMW = {"optim": {"name": "adamw", "lr": 0.05}}
RESUME_STAGES = (2, 3)
LAST = 7  # the AdamW runs' last step: three steps after their step-4 checkpoint


def _train_all(rank, world, configs: dict, features_of: str, checkpoint: str, images):
    """Train every config in turn in these processes, then the features of one run's checkpoint."""
    for cfg in configs.values():
        train(config_from_dict(cfg))
    if features_of is None:
        return None
    return teacher_features(*build_and_load(configs[features_of], checkpoint), images)


def _clip_error(engine, images, mode: str) -> float:
    """The engine's clipping of its gradient fragments against DeepSpeed's gathered gradients
    (safe_get_full_grad) clipped in float64."""
    from deepspeed.utils import safe_get_full_grad

    engine.ds.backward(engine.ds([images, images.flip(-1)]).square().sum())
    error = clip_error(mode, lambda: [safe_get_full_grad(p) for p in engine.partitions.student],
                       lambda max_norm: clip_grads_(engine.partitions.grad_fragments(), max_norm, mode, engine.group))
    engine.ds.optimizer.zero_grad(set_to_none=True)
    return error


@pytest.fixture(scope="module")
def runs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("deepspeed")
    data = write_images(str(root / "images"))
    configs = {}
    for mode in MODES:
        optim = {"clip_mode": mode}
        configs[f"ddp_{mode}"] = tiny_config(data, str(root / f"ddp_{mode}"), "ddp", 2, optim=optim)
        for stage in STAGES:
            configs[f"zero{stage}_{mode}"] = tiny_config(data, str(root / f"zero{stage}_{mode}"), "deepspeed", 2,
                                                         optim=optim, engine={"zero_stage": stage})
    configs["zero3_ac"] = tiny_config(data, str(root / "zero3_ac"), "deepspeed", 2,
                                      engine={"zero_stage": 3, "activation_checkpointing": "full"})
    # the example ds_config files, merged into massl's (DeepSpeed's options do not change the result)
    for name, stage in (("zero3_ac", 3), ("zero2_global", 2)):
        configs[name]["engine"]["deepspeed_config"] = os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.json")
    for cfg in configs.values():
        cfg["run"]["checkpoint_every"] = 1000  # at the last step only
    run_ranks(_train_all, 2, configs, None, None, images, timeout=1200)
    return {"data": data, "root": root, "configs": configs}


@pytest.fixture(scope="module")
def adamw_runs(tmp_path_factory, images):
    """ZeRO-2 and ZeRO-3 with AdamW (DeepSpeed's universal checkpoints, for another world size, carry
    Adam's state only), checkpointed at step 4 and run three steps further (Adam's step counters
    go wrong from the second step after a resume on)."""
    root = tmp_path_factory.mktemp("deepspeed_adamw")
    data = write_images(str(root / "images"))
    configs = {f"zero{stage}_adamw": tiny_config(data, str(root / f"zero{stage}_adamw"), "deepspeed", 2, **ADAMW,
                                                 run={"max_steps": LAST, "checkpoint_every": 4},
                                                 engine={"zero_stage": stage})
               for stage in RESUME_STAGES}
    features = run_ranks(_train_all, 2, configs, "zero3_adamw", step_dir(configs["zero3_adamw"]["run"]["output_dir"], 4),
                         images, timeout=1200)[0]
    return {"data": data, "root": root, "configs": configs, "zero3_features": features}


def _out(runs, name: str) -> str:
    return runs["configs"][name]["run"]["output_dir"]


def _assert_losses_match(got: dict, ref: dict, steps, what: str):
    for s in steps:
        assert abs(got[s] - ref[s]) <= RTOL * abs(ref[s]), f"{what} step {s}: {got[s]} vs {ref[s]}"


@pytest.mark.parametrize("mode", MODES)
def test_zero_stages_give_ddp_losses_and_teacher(runs, mode):
    ref = losses(_out(runs, f"ddp_{mode}"))
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert abs(ref[5] - ref[1]) > 100 * RTOL * ref[1]  # the run moves: agreement is not trivial
    ref_teacher = read_teacher_state_dict(step_dir(_out(runs, f"ddp_{mode}"), 5))
    torch.manual_seed(0)  # the runs' seed: their initial teacher
    initial = build_student_teacher(config_from_dict(runs["configs"][f"ddp_{mode}"]))[1].state_dict()
    assert max(float((ref_teacher[k] - initial[k]).abs().max()) for k in initial) > 1e-3
    for stage in STAGES:
        name = f"zero{stage}_{mode}"
        _assert_losses_match(losses(_out(runs, name)), ref, range(1, 6), name)
        teacher = read_teacher_state_dict(step_dir(_out(runs, name), 5))
        # one teacher file per checkpoint (teacher/), none in the engine's folder
        assert "teacher.safetensors" not in os.listdir(os.path.join(step_dir(_out(runs, name), 5), "engine")), name
        assert sorted(teacher) == sorted(ref_teacher)
        for key, want in ref_teacher.items():
            assert teacher[key].dtype == want.dtype, f"{name} teacher {key}"
            torch.testing.assert_close(teacher[key], want, rtol=RTOL, atol=ATOL, msg=f"{name} teacher {key}")


def test_zero3_activation_checkpointing_gives_the_same_losses(runs):
    _assert_losses_match(losses(_out(runs, "zero3_ac")), losses(_out(runs, "zero3_per_param")), range(1, 6), "zero3_ac")


def _resume_stages(rank, world, cfgs: dict, images):
    """Resume each ZeRO stage's W=2 checkpoint at this world size in the same processes; ZeRO-3 also
    gives its teacher's features and its clipping error, before training on."""
    out = {}
    for stage, cfg in cfgs.items():
        source = cfg["run"]["resume"]
        if stage == 3:
            out[stage] = resume_elsewhere(rank, world, cfg, source, images, _clip_error, MODES)
        else:
            train(config_from_dict(cfg))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_zero_checkpoints_resume_at_another_world_size(adamw_runs, images, world):
    """W=2 -> 1 and W=2 -> 4 through DeepSpeed's universal conversion, ZeRO-2 and ZeRO-3 with AdamW:
    every step after the resume (three, so that Adam's per-group step counters matter) equals the
    uninterrupted W=2 run's. At W=1 from checkpoints of the earlier layout (a second teacher file
    in the engine's folder); at W=4 with activation checkpointing toggled on."""
    root = adamw_runs["root"]
    sources = {stage: step_dir(_out(adamw_runs, f"zero{stage}_adamw"), 4) for stage in RESUME_STAGES}
    if world == 1:  # the earlier layout: a copy of the teacher in the engine's folder too
        for stage, source in sources.items():
            sources[stage] = str(root / f"zero{stage}_earlier_layout")
            shutil.copytree(source, sources[stage])
            shutil.copy(os.path.join(source, "teacher", "teacher.safetensors"),
                        os.path.join(sources[stage], "engine", "teacher.safetensors"))
    # at W=4 with activation checkpointing, which the W=2 runs had off (parameter names must not change)
    engine = {"activation_checkpointing": "full" if world == 4 else "none"}
    cfgs = {stage: tiny_config(adamw_runs["data"], str(root / f"zero{stage}_w{world}"), "deepspeed", world, **ADAMW,
                               run={"resume": sources[stage], "max_steps": LAST}, engine={"zero_stage": stage, **engine})
            for stage in RESUME_STAGES}
    got = run_ranks(_resume_stages, world, cfgs, images, timeout=1200)[0][3]
    ref = adamw_runs["zero3_features"]
    assert_resumed_like(got, ref, world, "ZeRO-3 gradient fragments", FEATURE_TOL)
    for stage, cfg in cfgs.items():
        resumed = losses(cfg["run"]["output_dir"])
        assert sorted(resumed) == list(range(5, LAST + 1))
        ref_losses = losses(_out(adamw_runs, f"zero{stage}_adamw"))
        _assert_losses_match(resumed, ref_losses, resumed, f"ZeRO-{stage} W=2 -> {world}")


def _resume(rank, world, cfg_dict):
    try:
        train(config_from_dict(cfg_dict))
    except ConfigError as e:
        return str(e)
    return "resumed"


def test_another_world_size_without_adam_state_is_refused(runs):
    """DeepSpeed's universal conversion keeps only Adam's state: an SGD checkpoint (momentum) at
    another world size is refused, saying what to do, before the optimiser is touched."""
    source = step_dir(_out(runs, "zero3_per_param"), 5)
    cfg = tiny_config(runs["data"], str(runs["root"] / "sgd_w1"), "deepspeed", 1, run={"resume": source},
                      engine={"zero_stage": 3})
    message = run_ranks(_resume, 1, cfg)[0]
    assert message.startswith("run.resume: ") and "2 ranks" in message and "optim.name=adamw" in message, message


def test_exported_zero3_teacher_loads_strictly_into_timm(adamw_runs, images, tmp_path):
    """massl-export's code path, in this process (no process group, no DeepSpeed needed to read)."""
    out = str(tmp_path / "teacher.safetensors")
    spec = export_teacher(step_dir(_out(adamw_runs, "zero3_adamw"), 4), out)
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        feats = model.eval()(images)
    np.testing.assert_allclose(feats.numpy(), adamw_runs["zero3_features"]["backbone"], rtol=FEATURE_TOL,
                               atol=FEATURE_TOL)


def test_zero_to_fp32_consolidates_the_student(adamw_runs, tmp_path):
    """docs/engines.md's command: DeepSpeed's script in the engine folder, with the tag."""
    checkpoint = step_dir(_out(adamw_runs, "zero3_adamw"), 4)
    script = os.path.join(checkpoint, "engine", "zero_to_fp32.py")
    out = str(tmp_path / "student")
    done = subprocess.run([sys.executable, script, os.path.join(checkpoint, "engine"), out, "-t", "zero"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    (name,) = os.listdir(out)
    state = torch.load(os.path.join(out, name), weights_only=True)
    torch.manual_seed(0)
    student = build_student_teacher(config_from_dict(adamw_runs["configs"]["zero3_adamw"]))[0]
    params = {k: tuple(p.shape) for k, p in student.named_parameters()}
    assert {k: tuple(state[k].shape) for k in params if k in state} == params  # (and buffers)
    assert set(state) <= set(student.state_dict()) and all(state[k].dtype == torch.float32 for k in params)


def _overflow_then_normal_step(rank, world, cfg_dicts: list) -> list:
    """For each config in turn: a step with a non-finite gradient (a NaN pixel), then a normal one:
    what each changed."""
    return [_overflow_then_normal_step_of(cfg_dict) for cfg_dict in cfg_dicts]


def _overflow_then_normal_step_of(cfg_dict) -> dict:
    cfg = config_from_dict(cfg_dict)
    env = init_distributed(cfg.run.device)
    engine, objective = build_step(cfg, env)
    memory = objective.memory
    h = Hyper(lr=0.01, wd=0.04, teacher_momentum=0.9, teacher_temp=0.07)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(cfg.data.batch_size, 3, s, s, generator=g) for s in (32, 32, 16, 16)]

    def snapshot():  # the teacher's weights (its BatchNorm statistics follow every forward, as in any engine)
        weights = {n for n, _ in engine.teacher_module.named_parameters()}
        return ({k: v.clone() for k, v in engine.partitions.full_state_dict().items() if k in weights},
                [m.clone() for m in engine.partitions.masters()], memory.bank.clone(), memory.ptr)

    states, skipped, applied = [snapshot()], [], []
    for step, poison in enumerate((True, False)):
        batch = [c.clone() for c in crops]
        if poison:
            batch[0][0, 0, 0, 0] = float("nan")
        out = train_step(engine, objective, batch, step, h)
        skipped.append(float(out["skipped_steps"]))
        applied.append(engine.step_applied())
        states.append(snapshot())
    # the periodic k-NN's path (the teacher's backbone gathered alone), then a step again
    with torch.no_grad(), engine.teacher_backbone() as backbone:
        features = backbone(crops[0])
    train_step(engine, objective, [c.clone() for c in crops], 2, h)
    assert bool(torch.isfinite(features).all()) and engine.step_applied()
    moved = []
    for before, after in zip(states[:-1], states[1:]):
        moved.append({
            "teacher": any(not torch.equal(before[0][k], after[0][k]) for k in before[0]),
            "student": any(not torch.equal(a, b) for a, b in zip(before[1], after[1])),
            "memory": not torch.equal(before[2], after[2]) or before[3] != after[3]})
    return {"skipped": skipped, "applied": applied, "moved": moved}


SKIPPING = [("bf16", 1), ("bf16", 2), ("fp32", 3)]  # bf16: DeepSpeed's overflow check; ZeRO-3: a non-finite norm, any precision


def test_a_skipped_step_moves_neither_teacher_nor_memory(tmp_path):
    """DeepSpeed skips a step whose gradient is not finite (bf16's check_grad_overflow; ZeRO-3's
    norm check, also in fp32): the step is counted, and the student, the teacher and the memory stay
    as they were; the next step moves all three. One process for both."""
    cfgs = [tiny_config(str(tmp_path), str(tmp_path / f"{precision}_zero{stage}"), "deepspeed", 1,
                        run={"precision": precision}, **ADAMW, engine={"zero_stage": stage})
            for precision, stage in SKIPPING]
    for (precision, stage), got in zip(SKIPPING, run_ranks(_overflow_then_normal_step, 1, cfgs, timeout=900)[0]):
        what = f"{precision} ZeRO-{stage}"
        assert got["skipped"] == [1.0, 1.0] and got["applied"] == [False, True], (what, got)
        assert got["moved"][0] == {"teacher": False, "student": False, "memory": False}, (what, got)
        assert got["moved"][1] == {"teacher": True, "student": True, "memory": True}, (what, got)

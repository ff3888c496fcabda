"""Shared pieces of the engine tests: a tiny image folder, a tiny training config, an engine
loaded from a checkpoint and its teacher's features."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from PIL import Image

from massl.checkpoint import CheckpointManager
from massl.config import config_from_dict
from massl.dist import init_distributed
from massl.train import build_step, train
from massl.trainer_state import TrainerState
from tests.conftest import TINY_MODEL

N_IMAGES = 24  # 3 global batches of 8: five steps cross an epoch boundary
GLOBAL_BATCH = 8

BASE = {
    "run": {"device": "cpu", "precision": "fp32", "max_steps": 5, "threads": 1, "seed": 0, "resume": "auto",
            "log_every": 1, "tensorboard": False, "checkpoint_every": 2, "keep_last": 3},
    "model": {**TINY_MODEL, "head_bottleneck_dim": 32, "head_use_bn": True},
    "memory": {"size": 64, "partition_size": 32},
    "loss": {"warmup_teacher_temp_epochs": 1},
    # SGD: exact enough to compare engines step by step (AdamW amplifies rounding in near-zero gradients); the per-parameter
    # clip (0.5, gradient norms are ~30) is active on every step.
    "optim": {"name": "sgd", "epochs": 4, "lr": 0.5, "min_lr": 0.0, "warmup_epochs": 0, "clip_grad": 0.5,
              "clip_mode": "per_param", "teacher_momentum": 0.9},
    "data": {"batch_size": GLOBAL_BATCH, "num_workers": 0, "global_crop_size": 32, "local_crop_size": 16,
             "local_crops_number": 2},
    "engine": {"name": "single"},
}


def write_images(root: str, n: int = N_IMAGES, size: int = 40, seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:03d}.png"))
    return root


def tiny_config(data: str, out: str, engine_name: str = "single", world: int = 1, **sections) -> dict:
    """The tiny run as a config dict; `sections` update its sections, e.g. run={"max_steps": 7}."""
    cfg = copy.deepcopy(BASE)
    cfg["run"]["output_dir"] = out
    cfg["data"]["path"] = data
    cfg["data"]["batch_size"] = GLOBAL_BATCH // world
    cfg["engine"]["name"] = engine_name
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out)}


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:09d}")


def build_and_load(cfg_dict, checkpoint):
    """A fresh engine and memory (initialised from another seed, so only loading can make them
    right) loaded from `checkpoint`."""
    other_seed = copy.deepcopy(cfg_dict)
    other_seed["run"]["seed"] = other_seed["run"].get("seed", 0) + 1
    cfg = config_from_dict(other_seed)
    env = init_distributed(cfg.run.device)
    engine, objective = build_step(cfg, env)
    memory = objective.memory
    CheckpointManager.load(checkpoint, {"engine": engine, "memory": memory, "trainer": TrainerState(env, cfg.run.seed)})
    return engine, memory


def teacher_features(engine, memory, images):
    """Teacher backbone features and head outputs (eval mode) on `images`, and the whole memory,
    as numpy arrays (tensors would travel back through shared memory that dies with the process)."""
    captured = {}
    hook = engine.teacher.backbone.register_forward_hook(lambda m, i, out: captured.update(backbone=out.detach()))
    engine.teacher.eval()
    with torch.no_grad():
        head = engine.teacher([images])[0]
    hook.remove()
    return {"backbone": captured["backbone"].numpy(), "head": head.numpy(),
            "memory": memory.full_state_dict()["bank"].numpy(), "ptr": memory.ptr}


def clip_error(mode: str, full_grads, clip) -> float:
    """Max relative deviation of an engine's sharded gradient clipping from clipping the full
    averaged gradients in float64. `full_grads()` gathers the gradients (after a backward);
    `clip(max_norm)` runs the engine's clipping on its local fragments and returns the total norm.
    per_param clips at the median norm (about half of the parameters, one by one), global at half
    the total norm."""
    full = [g.double() for g in full_grads()]
    norms = torch.stack([g.norm() for g in full])
    total = float(norms.norm())
    if mode == "per_param":
        max_norm = float(norms.median())
        expected = [g * min(1.0, max_norm / (float(n) + 1e-6)) for g, n in zip(full, norms)]
    else:
        max_norm = total / 2
        expected = [g * min(1.0, max_norm / (total + 1e-6)) for g in full]
    clipped_total = float(clip(max_norm))
    got = [g.double() for g in full_grads()]
    errors = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, expected)]
    return max(errors + [abs(clipped_total / total - 1)])


def resume_elsewhere(rank, world, cfg_dict, checkpoint, images, engine_clip_error, modes):
    """In a run_ranks process: load `checkpoint` at this world size, the teacher's features, the
    clipping error per mode (world > 1), then train on to the end of the config's run."""
    engine, memory = build_and_load(cfg_dict, checkpoint)
    result = teacher_features(engine, memory, images)
    if world > 1:
        result["clip_error"] = {m: engine_clip_error(engine, images, m) for m in modes}
    train(config_from_dict(cfg_dict))
    return result


def assert_resumed_like(got: dict, ref: dict, world: int, what: str, tol: float = 1e-5) -> None:
    """A run resumed at another world size (resume_elsewhere's result) holds the reference run's
    state: the memory and its pointer exactly, the teacher's features to `tol`, and with several
    ranks its clipping of `what` (the engine's local gradients) equal to the float64 reference."""
    np.testing.assert_array_equal(got["memory"], ref["memory"])
    assert got["ptr"] == ref["ptr"]
    for key in ("backbone", "head"):
        np.testing.assert_allclose(got[key], ref[key], rtol=tol, atol=tol)
    if world > 1:
        for mode, err in got["clip_error"].items():
            assert err < 1e-5, f"{mode} clipping of {what} is off by {err}"

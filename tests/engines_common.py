"""Shared pieces of the engine tests: a tiny image folder and a tiny training config."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
from PIL import Image

N_IMAGES = 24  # 3 global batches of 8: five steps cross an epoch boundary
GLOBAL_BATCH = 8

BASE = {
    "run": {"device": "cpu", "precision": "fp32", "max_steps": 5, "threads": 1, "seed": 0, "resume": "auto",
            "log_every": 1, "tensorboard": False, "checkpoint_every": 2, "keep_last": 3},
    "model": {"arch": "custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.0,
              "head_hidden_dim": 64, "head_bottleneck_dim": 32, "head_use_bn": True},
    "memory": {"size": 64, "partition_size": 32},
    "loss": {"warmup_teacher_temp_epochs": 1},
    # SGD: exact enough to compare engines step by step (pitfalls.md #8); the per-parameter
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

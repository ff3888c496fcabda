"""Checkpoints written by massl before each checkpoint part had its own folder still resume and export.

tests/data/checkpoints_v1/<engine>/ holds the step-2 checkpoint of a 3-step run made by that
code (commit bfb580d: `single` at W=1, `fsdp` at W=2, AdamW, tiny ViT, 24 random images) and the
metrics.jsonl of the whole uninterrupted run. The config below is that run's (CONFIG of the script
that wrote them); the images are rebuilt here by the same generator.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from massl.config import config_from_dict
from massl.export import export_teacher
from massl.train import train
from tests.engines_common import losses, write_images

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints_v1")
CONFIG = {
    "run": {"device": "cpu", "precision": "fp32", "max_steps": 3, "threads": 1, "seed": 0, "log_every": 1,
            "tensorboard": False, "checkpoint_every": 2},
    "model": {"arch": "custom", "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "drop_path": 0.0,
              "head_hidden_dim": 32, "head_bottleneck_dim": 16},
    "memory": {"size": 32, "partition_size": 8},
    "loss": {"warmup_teacher_temp_epochs": 0, "warmup_teacher_temp": 0.07},
    "optim": {"name": "adamw", "epochs": 4, "lr": 0.05, "min_lr": 0.0, "warmup_epochs": 0, "clip_grad": 3.0,
              "momentum_teacher": 0.9},  # the key's old name, as these runs' configs have it
    "data": {"batch_size": 8, "num_workers": 0, "global_crop_size": 16, "local_crops_number": 0,
             # crops and flips only: the photometric ops' implementation changed since (docs/data.md)
             "aug": {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob_global1": 0.0,
                     "blur_prob_global2": 0.0, "solarize_prob_global2": 0.0}},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")), n=24, size=24)


def _copy(engine: str, tmp_path) -> str:
    """A copy of the old checkpoint (the tests must not write into the repository)."""
    return shutil.copytree(os.path.join(DATA, engine, "step_000000002"), str(tmp_path / "step_000000002"))


@pytest.mark.parametrize("engine", ["single", "fsdp"])
def test_old_checkpoint_resumes_and_reproduces_the_next_loss(engine, images, tmp_path):
    """The fsdp checkpoint of W=2 resumes here at W=1 (DCP reshards; the data order depends only on the
    global batch), so both give the old uninterrupted run's step-3 loss."""
    cfg = copy.deepcopy(CONFIG)
    cfg["run"].update(output_dir=str(tmp_path / "run"), resume=_copy(engine, tmp_path))
    cfg["data"]["path"] = images
    cfg["engine"] = {"name": engine}
    try:
        train(config_from_dict(cfg))
    finally:
        if torch.distributed.is_initialized():  # fsdp at W=1 started a one-rank group
            torch.distributed.destroy_process_group()
    recorded = losses(os.path.join(DATA, engine))
    assert sorted(recorded) == [1, 2, 3]
    got = losses(cfg["run"]["output_dir"])
    assert sorted(got) == [3]
    assert abs(got[3] - recorded[3]) <= 1e-5 * abs(recorded[3]), (got[3], recorded[3])


def _teacher_backbone_as_written(engine: str, directory: str) -> dict:
    """The teacher backbone straight from the old files (not through massl's reader)."""
    prefix = "teacher.backbone."
    if engine == "single":
        state = torch.load(os.path.join(directory, "state.pt"), weights_only=True)["teacher"]
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    entries = FileSystemReader(directory).read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items() if k.startswith(prefix)}
    dcp.load(flat, storage_reader=FileSystemReader(directory), no_dist=True)
    return {k[len(prefix):]: v for k, v in flat.items()}


@pytest.mark.parametrize("engine", ["single", "fsdp"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the reference read, in one process on purpose
def test_old_checkpoint_exports_the_teacher(engine, tmp_path):
    directory = _copy(engine, tmp_path)
    out = str(tmp_path / "teacher.safetensors")
    export_teacher(directory, out, trust_checkpoint=True)  # no teacher.safetensors: the old pickles
    with open(out + ".json") as f:
        spec = json.load(f)
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    exported = load_file(out)
    model.load_state_dict(exported, strict=True)
    written = _teacher_backbone_as_written(engine, directory)
    assert sorted(written) == sorted(exported)
    for key, value in written.items():
        assert torch.equal(exported[key], value), key

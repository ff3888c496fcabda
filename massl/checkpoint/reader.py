"""One checkpoint reader for the tools (massl-export, massl-eval) and for resuming: resolve a run
or checkpoint directory, read its config, read the teacher of any engine's format, without a
process group."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..config import Config, config_from_dict
from .legacy import engine_directory
from .manager import MANIFEST, CheckpointManager, is_complete, read_checkpoint_manifest


def resolve_checkpoint(path: str) -> str:
    """A run directory (-> its newest complete checkpoint) or a checkpoint directory."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        ok, reason = is_complete(path)
        if not ok:
            raise ValueError(f"checkpoint {path} is incomplete: {reason}")
        return path
    found = CheckpointManager(path, keep_last=1, is_main=False).latest_complete()
    if found is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint directory nor a run directory with a complete checkpoint")
    return found


def read_config(ckpt_dir: str) -> Config:
    """The run's config, as saved in the checkpoint (keys of other massl versions ignored)."""
    return config_from_dict(read_checkpoint_manifest(ckpt_dir)["config"], check_paths=False, strict=False)


def read_teacher_state_dict(ckpt_dir: str) -> dict:
    """Full teacher (backbone + head) state dict on the CPU, for any engine's format."""
    from ..engines import read_teacher_state_dict as read_format

    manifest = read_checkpoint_manifest(ckpt_dir)
    return read_format(manifest.get("format", "torch"), engine_directory(ckpt_dir, manifest))


def read_teacher_backbone(ckpt_dir: str) -> dict:
    """The teacher's backbone weights as a plain timm state dict (prefix `backbone.` removed)."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in read_teacher_state_dict(ckpt_dir).items() if k.startswith(prefix)}


def load_teacher_backbone(checkpoint: str, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, Config]:
    """The trained teacher backbone of a run or checkpoint, or the same architecture at random
    init (`random_init`, drawn from `seed`), in eval mode, with the run's config."""
    from ..models import build_backbone

    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(ckpt_dir)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model, cfg.data.global_crop_size)
    if not random_init:
        backbone.load_state_dict(read_teacher_backbone(ckpt_dir), strict=True)
    return backbone.eval(), cfg

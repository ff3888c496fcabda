"""Load a teacher backbone from a checkpoint (or at random init); the evaluation transform."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torchvision.transforms as T

from ..checkpoint import CheckpointManager, is_complete, read_manifest
from ..config import Config, config_from_dict
from ..engines import load_teacher_state_dict
from ..models import build_backbone


def resolve_checkpoint(path: str) -> str:
    """A run directory (-> its newest complete checkpoint) or a checkpoint directory."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        ok, reason = is_complete(path)
        if not ok:
            raise ValueError(f"checkpoint {path} is incomplete: {reason}")
        return path
    found = CheckpointManager(path, keep_last=1, is_main=False).latest_complete()
    if found is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint directory nor a run directory with a complete checkpoint")
    return found


def checkpoint_config(ckpt_dir: str) -> Config:
    return config_from_dict(read_manifest(ckpt_dir)["config"], check_paths=False, strict=False)


def teacher_backbone_state(ckpt_dir: str) -> dict:
    """The teacher's backbone weights as a plain timm state dict (prefix `backbone.` removed)."""
    state = load_teacher_state_dict(ckpt_dir)
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def load_backbone(checkpoint: str, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, Config]:
    """The trained teacher backbone of `checkpoint`, or the same architecture at random init."""
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt_dir)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model, cfg.data.global_crop_size)
    if not random_init:
        backbone.load_state_dict(teacher_backbone_state(ckpt_dir), strict=True)
    return backbone.eval(), cfg


def eval_transform(mean, std, size: int, crop_ratio: float = 0.875):
    """PIL RGB image -> normalised float tensor: bicubic resize of the short side to size/crop_ratio,
    centre crop of size x size (DINO's evaluation transform; crop_ratio 1 keeps the whole image)."""
    return T.Compose([T.Resize(int(round(size / crop_ratio)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

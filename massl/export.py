"""Export the teacher backbone of a checkpoint as a plain timm state dict (safetensors or .pth).

The file loads strictly into `timm.create_model(model_name, **kwargs)` with the name and kwargs
written beside it in `<out>.json`.
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoint.reader import load_backbone_strictly, read_config, read_teacher_backbone, resolve_checkpoint
from .errors import UserError
from .fileio import save_safetensors, write_json_atomic
from .models import backbone_spec, build_backbone


def export_teacher(checkpoint: str, out: str, trust_checkpoint: bool = False) -> dict:
    """Write the teacher backbone of `checkpoint` (a run or checkpoint directory) to `out`;
    `trust_checkpoint`: also read a checkpoint without teacher.safetensors (pickles: can run code)."""
    if not out.endswith((".safetensors", ".pth", ".pt")):
        raise UserError(f"--out {out!r}: use a .safetensors, .pth or .pt file name")
    if os.path.isdir(out):
        raise UserError(f"--out {out!r}: is a directory; give a file name in it")
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(ckpt_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in read_teacher_backbone(ckpt_dir, trust_checkpoint).items()}
    # the model the spec names, loaded strictly before anything is written: a file that would not
    # load into timm.create_model(...) is never exported
    load_backbone_strictly(build_backbone(cfg.model, cfg.data.global_crop_size), state, ckpt_dir)
    spec = {**backbone_spec(cfg.model, cfg.data.global_crop_size), "checkpoint": os.path.abspath(ckpt_dir),
            "mean": cfg.data.aug.mean, "std": cfg.data.aug.std}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    try:
        if out.endswith(".safetensors"):
            save_safetensors(state, tmp, metadata={"massl": json.dumps(spec)})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:  # a failed write leaves nothing behind
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json_atomic(out + ".json", spec)
    return spec

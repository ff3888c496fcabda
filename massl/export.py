"""Export the teacher backbone of a checkpoint as a plain timm state dict (safetensors or .pth).

The file loads strictly into `timm.create_model(model_name, **kwargs)` with the name and kwargs
written beside it in `<out>.json`.
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoint.reader import read_config, read_teacher_backbone, resolve_checkpoint
from .fileio import write_json_atomic
from .models import backbone_spec


def export_teacher(checkpoint: str, out: str) -> dict:
    if not out.endswith((".safetensors", ".pth", ".pt")):
        raise ValueError(f"--out {out!r}: use a .safetensors, .pth or .pt file name")
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(ckpt_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in read_teacher_backbone(ckpt_dir).items()}
    spec = {**backbone_spec(cfg.model, cfg.data.global_crop_size), "checkpoint": os.path.abspath(ckpt_dir),
            "mean": cfg.data.aug.mean, "std": cfg.data.aug.std}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, tmp, metadata={"massl": json.dumps(spec)})
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    write_json_atomic(out + ".json", spec)
    return spec

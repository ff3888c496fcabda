"""One checkpoint reader for the tools (massl-export, massl-eval) and for resuming: resolve a run
or checkpoint directory, read its config, read the teacher, without a process group.

The tools read only JSON (manifest.json) and safetensors (teacher/teacher.safetensors, checked
against its recorded sha256): never a pickle, which can run code. A checkpoint without that file
(written by an older massl) is read through its engine's pickled files only with `trust=True`
(`--trust-checkpoint`)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..config import Config, config_from_dict
from ..errors import UserError
from ..fileio import sha256_file
from .legacy import engine_directory
from .manager import MANIFEST, CheckpointManager, is_complete, read_checkpoint_manifest
from .teacher import TEACHER_PATH


def resolve_checkpoint(path: str) -> str:
    """A run directory (-> its newest complete checkpoint) or a checkpoint directory."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        ok, reason = is_complete(path)
        if not ok:
            raise UserError(f"checkpoint {path} is incomplete: {reason}")
        return path
    found = CheckpointManager(path, keep_last=1, is_main=False).latest_complete()
    if found is None:
        raise UserError(f"{path!r} is neither a checkpoint directory nor a run directory with a complete checkpoint")
    return found


def read_config(ckpt_dir: str) -> Config:
    """The run's config, as saved in the checkpoint (keys of other massl versions ignored)."""
    return config_from_dict(read_checkpoint_manifest(ckpt_dir)["config"], check_paths=False, strict=False)


def read_teacher_state_dict(ckpt_dir: str, trust: bool = False) -> dict:
    """Full teacher (backbone + head) state dict on the CPU, from teacher.safetensors; with
    `trust`, from the engine's files of a checkpoint that lacks it."""
    manifest = read_checkpoint_manifest(ckpt_dir)
    path = os.path.join(ckpt_dir, TEACHER_PATH)
    if os.path.isfile(path):
        recorded = manifest.get("sha256", {}).get(TEACHER_PATH)
        if recorded is not None and sha256_file(path)[0] != recorded:
            raise UserError(f"--checkpoint {ckpt_dir}: {TEACHER_PATH} does not match the sha256 recorded when it "
                            f"was saved: the file is damaged; use another checkpoint")
        return read_safetensors(path, f"--checkpoint {ckpt_dir}: {TEACHER_PATH}")
    if not trust:
        raise UserError(f"--checkpoint {ckpt_dir}: has no {TEACHER_PATH} (written by an older massl, or not by "
                        f"massl); its other files are pickles, which can run code when read: pass "
                        f"--trust-checkpoint only if you trust where this checkpoint comes from")
    from ..engines import read_teacher_state_dict as read_format

    return read_format(manifest.get("format", "torch"), engine_directory(ckpt_dir, manifest))


def read_safetensors(path: str, name: str) -> dict:
    """A safetensors file's tensors; a malformed one (header, offsets, truncation) is a UserError
    that starts with `name`, not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"{name}: not a readable safetensors file ({' '.join(str(e).split())}); use another "
                        f"checkpoint") from None


def state_mismatches(want: dict, state: dict, shown: int = 4) -> list[str]:
    """What keeps `state` from loading strictly into a module whose state dict is `want`: missing
    keys, unexpected keys and tensors of another shape, a few named of each; [] when it fits."""
    missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (the model has {tuple(want[k].shape)})"
              for k in sorted(want.keys() & state.keys()) if state[k].shape != want[k].shape]
    return [f"{len(keys)} {what}, e.g. {', '.join(keys[:shown])}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]


def load_backbone_strictly(backbone: nn.Module, state: dict, ckpt_dir: str) -> None:
    """Load `state` into `backbone` with every key and shape matching, or a UserError in one line
    that says what does not match (a file that could not load must never be exported or used)."""
    want = backbone.state_dict()
    if not state:
        raise UserError(f"--checkpoint {ckpt_dir}: the teacher holds no backbone tensors; use another checkpoint")
    problems = state_mismatches(want, state, shown=1)
    if problems:
        raise UserError(f"--checkpoint {ckpt_dir}: the teacher does not fit the model of the run's config: tensors "
                        f"{'; '.join(problems)}; use the checkpoint of this run")
    backbone.load_state_dict(state, strict=True)


def read_teacher_backbone(ckpt_dir: str, trust: bool = False) -> dict:
    """The teacher's backbone weights as a plain timm state dict (prefix `backbone.` removed)."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in read_teacher_state_dict(ckpt_dir, trust).items() if k.startswith(prefix)}


def load_teacher_backbone(checkpoint: str, random_init: bool = False, seed: int = 0,
                          trust: bool = False) -> tuple[nn.Module, Config]:
    """The trained teacher backbone of a run or checkpoint, or the same architecture at random
    init (`random_init`, drawn from `seed`), in eval mode, with the run's config."""
    from ..models import build_backbone

    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(ckpt_dir)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model, cfg.data.global_crop_size)
    if not random_init:
        load_backbone_strictly(backbone, read_teacher_backbone(ckpt_dir, trust), ckpt_dir)
    return backbone.eval(), cfg

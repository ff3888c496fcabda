"""Load a teacher backbone from a checkpoint (or at random init) and extract features of an image folder."""
from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

from ..checkpoint import CheckpointManager, is_complete, read_manifest
from ..config import Config, config_from_dict
from ..data.folder import scan_image_folder
from ..engines import load_teacher_state_dict
from ..image import to_rgb
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


def eval_transform(cfg: Config, image_size: int = 0, crop_ratio: float = 0.875):
    size = image_size or cfg.data.global_crop_size
    interp = T.InterpolationMode.BICUBIC
    return T.Compose([T.Resize(int(round(size / crop_ratio)), interpolation=interp), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(cfg.data.aug.mean, cfg.data.aug.std)])


class _Folder(torch.utils.data.Dataset):
    def __init__(self, root: str, transform):
        self.paths, self.labels, self.classes = scan_image_folder(root)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(to_rgb(img)), self.labels[i]


@torch.no_grad()
def extract_features(backbone: nn.Module, root: str, transform, batch_size: int = 256, num_workers: int = 2,
                     device: str = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(L2-normalised features [N, d], labels [N], class names) of a labelled image folder."""
    data = _Folder(root, transform)
    if min(data.labels) < 0:
        raise ValueError(f"{root!r} has images outside class sub-folders; k-NN needs labelled folders")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    backbone = backbone.to(device)
    feats, labels, t0 = [], [], time.perf_counter()
    for i, (x, y) in enumerate(loader):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            feats.append(nn.functional.normalize(backbone(x.to(device)).float(), dim=-1).cpu())
        labels.append(y)
        if progress and (i + 1) % 20 == 0:
            done = (i + 1) * batch_size
            rate = done / (time.perf_counter() - t0)
            print(f"  features {root}: {done}/{len(data)} ({rate:.0f} img/s, eta {(len(data) - done) / rate:.0f} s)", flush=True)
    return torch.cat(feats), torch.cat(labels), data.classes

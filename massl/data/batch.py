"""The Batch a DataSource yields, its collate function, and the move to the device (`prepare`)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..config import DataConfig
from .gpu_augment import GpuAugment, normalize


class Batch(NamedTuple):
    crops: list  # V uint8 tensors [B, 3, H, W]: fully augmented, or only cropped when `params` is set
    skipped: int  # unreadable samples replaced in this batch
    params: Optional[list] = None  # gpu_augment: V float tensors [B, NUM_PARAMS] (multicrop.PARAM_NAMES)
    keys: tuple = ()  # sample ids: webdataset keys, image-folder indices
    unreadable: tuple = ()  # (file, reason) of each unreadable file passed over, for the source to name


def collate(samples) -> Batch:
    """samples: ((crops, params), skipped, key, unreadable) per image -> one Batch, stacked per view."""
    views = len(samples[0][0][0])
    crops = [torch.stack([s[0][0][v] for s in samples]) for v in range(views)]
    params = None
    if samples[0][0][1] is not None:
        rows = torch.stack([s[0][1] for s in samples])  # [B, V, P]
        params = [rows[:, v].contiguous() for v in range(views)]
    return Batch(crops, sum(s[1] for s in samples), params, tuple(s[2] for s in samples),
                 tuple(u for s in samples for u in s[3]))


class DevicePrepare:
    """Batch -> V normalised float32 crop tensors on the device; with data.gpu_augment the
    photometric ops run there first (gpu_augment.py)."""

    def __init__(self, d: DataConfig, on_device: bool = False):
        self.mean, self.std = list(d.aug.mean), list(d.aug.std)
        self.augment = GpuAugment(self.mean, self.std) if on_device else None

    def __call__(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        out = []
        for v, crops in enumerate(batch.crops):
            crops = crops.to(device, non_blocking=True)
            if batch.params is not None:
                out.append(self.augment(crops, batch.params[v]))
            else:
                out.append(normalize(crops, self.mean, self.std))
        return out

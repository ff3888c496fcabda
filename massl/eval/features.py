"""Features of a labelled image folder through a frozen backbone (massl.checkpoint.reader loads it)."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

from ..config import Config
from ..data.files import scan_image_folder
from ..image import to_rgb
from ..logging import log


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
    device = torch.device(device)
    backbone = backbone.to(device)
    feats, labels, t0 = [], [], time.perf_counter()
    for i, (x, y) in enumerate(loader):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type != "cpu"):
            feats.append(nn.functional.normalize(backbone(x.to(device)).float(), dim=-1).cpu())
        labels.append(y)
        if progress and (i + 1) % 20 == 0:
            done = (i + 1) * batch_size
            rate = done / (time.perf_counter() - t0)
            log.info(f"  features {root}: {done}/{len(data)} ({rate:.0f} img/s, eta {(len(data) - done) / rate:.0f} s)")
    return torch.cat(feats), torch.cat(labels), data.classes

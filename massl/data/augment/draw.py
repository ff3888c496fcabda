"""Every random choice of one crop, drawn up front from the sample's own RNG, and the parameter
row that carries a crop's photometric choices to the device (`PARAM_NAMES`).

Each sample's randomness comes from random.Random(f"{seed}-{epoch}-{index}"), so a sample gets
the same crops whatever the rank, worker count or resume point. Drawing everything before any
pixel is touched lets the decoder pick a reduced JPEG scale that still serves every crop, and
lets data.gpu_augment ship the photometric parameters instead of applying them in the worker.
The distributions are those of the published recipe (torchvision's transforms; docs/data.md).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...config import AugConfig

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision ColorJitter's op ids 0..3
# One row of photometric parameters per crop, the contract of device.py (and of cpu.py's op ids).
PARAM_NAMES = ("flip", "jitter", "brightness", "contrast", "saturation", "hue",
               "order0", "order1", "order2", "order3", "gray", "blur_sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
COL = {name: i for i, name in enumerate(PARAM_NAMES)}
BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis
BLUR_SIGMA = (0.1, 2.0)  # the recipe's blur radius range (sigma of PIL's GaussianBlur)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}-{epoch}-{index}")


def random_resized_crop_box(rng: random.Random, width: int, height: int, scale, ratio=(3 / 4, 4 / 3)):
    """(left, top, w, h) as torchvision's RandomResizedCrop.get_params, with our RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple
    blur_prob: float
    solarize_prob: float


@dataclass
class CropParams:
    """Every random choice of one crop. Boxes are in full-resolution pixels of the source image."""

    box: tuple  # left, top, width, height
    angle: float = 0.0  # rotation of the source before cropping (data.aug.rotation_degrees)
    flip: bool = False
    jitter: Optional[tuple] = None  # (order: 4 op ids, brightness, contrast, saturation, hue) when applied
    gray: bool = False
    blur_sigma: float = 0.0  # 0: no blur
    solarize: bool = False

    def as_row(self) -> list:
        order, b, c, s, h = self.jitter or ((0, 1, 2, 3), 1.0, 1.0, 1.0, 0.0)
        return [float(self.flip), float(self.jitter is not None), b, c, s, h, *map(float, order),
                float(self.gray), self.blur_sigma, float(self.solarize)]


def draw_crop(rng: random.Random, a: AugConfig, width: int, height: int, view: ViewSpec) -> CropParams:
    """Draw one crop's parameters with the distributions of method.md / torchvision's transforms."""
    angle = rng.uniform(-a.rotation_degrees, a.rotation_degrees) if a.rotation_degrees > 0 else 0.0
    p = CropParams(box=random_resized_crop_box(rng, width, height, view.scale), angle=angle)
    p.flip = rng.random() < a.flip_prob
    if rng.random() < a.color_jitter_prob:
        factors = (rng.uniform(max(0.0, 1 - a.brightness), 1 + a.brightness),
                   rng.uniform(max(0.0, 1 - a.contrast), 1 + a.contrast),
                   rng.uniform(max(0.0, 1 - a.saturation), 1 + a.saturation),
                   rng.uniform(-a.hue, a.hue))
        order = [0, 1, 2, 3]
        rng.shuffle(order)  # torchvision's ColorJitter applies its four ops in random order
        p.jitter = (tuple(order), *factors)
    p.gray = rng.random() < a.grayscale_prob
    if rng.random() < view.blur_prob:
        p.blur_sigma = rng.uniform(*BLUR_SIGMA)
    p.solarize = rng.random() < view.solarize_prob
    return p


def param_rows(crops: list[CropParams]) -> torch.Tensor:
    """[V, NUM_PARAMS]: the rows device.py applies."""
    return torch.tensor([p.as_row() for p in crops], dtype=torch.float32)




def box_radius(sigma: float, passes: int = BLUR_PASSES) -> tuple[int, float]:
    """PIL's GaussianBlur box: (integer radius l, weight a of the two taps at l + 1) such that
    `passes` such boxes have variance sigma^2 exactly (Gwosdek et al. 2011, as Pillow's BoxBlur.c)."""
    s2 = sigma * sigma / passes
    l = math.floor((math.sqrt(12 * s2 + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    return l, a


BOX_RADIUS = box_radius(BLUR_SIGMA[1])[0] + 1  # taps each side of the widest box (2)


def blur_box(sigma: float) -> np.ndarray:
    """float64 [2 * BOX_RADIUS + 1]: one of PIL's GaussianBlur passes; BLUR_PASSES of them per
    axis have variance sigma^2 at every sigma (a sampled Gaussian loses it below sigma ~0.5)."""
    l, a = box_radius(sigma)
    if l + 1 > BOX_RADIUS:
        raise ValueError(f"blur sigma {sigma} is above the recipe's range {BLUR_SIGMA}")
    box = np.concatenate([[a], np.ones(2 * l + 1), [a]]) / (2 * l + 1 + 2 * a)
    return np.pad(box, BOX_RADIUS - l - 1)


def blur_boxes(sigmas) -> torch.Tensor:
    """float32 [N, 2 * BOX_RADIUS + 1]: `blur_box` per sigma (the device path's batch of boxes)."""
    boxes = np.array([blur_box(float(s)) for s in sigmas], dtype=np.float32)
    return torch.from_numpy(boxes).reshape(-1, 2 * BOX_RADIUS + 1)

"""Multi-crop augmentation of method.md ("Augmentations"), driven by an explicit per-sample RNG.

Each sample's randomness comes from random.Random(f"{seed}-{epoch}-{index}"), so a sample gets
the same crops whatever the rank, worker count or resume point.
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from ..config import DataConfig

INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


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


class MultiCropAugmentation:
    """PIL image -> [2 global crops, L local crops] as normalised float tensors."""

    def __init__(self, d: DataConfig):
        self.d, self.a = d, d.aug
        self.interp = INTERP[self.a.interpolation]
        self.mean, self.std = list(self.a.mean), list(self.a.std)

    @property
    def num_views(self) -> int:
        return 2 + self.d.local_crops_number

    def crop(self, rng, img: Image.Image, size: int, scale) -> Image.Image:
        if self.a.rotation_degrees > 0:
            img = img.rotate(rng.uniform(-self.a.rotation_degrees, self.a.rotation_degrees), resample=Image.BILINEAR)
        left, top, w, h = random_resized_crop_box(rng, img.width, img.height, scale)
        return img.resize((size, size), self.interp, box=(left, top, left + w, top + h))

    def photometric(self, rng, img: Image.Image, blur_prob: float, solarize_prob: float) -> torch.Tensor:
        a = self.a
        if rng.random() < a.flip_prob:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < a.color_jitter_prob:
            ops = [
                (TF.adjust_brightness, rng.uniform(max(0.0, 1 - a.brightness), 1 + a.brightness)),
                (TF.adjust_contrast, rng.uniform(max(0.0, 1 - a.contrast), 1 + a.contrast)),
                (TF.adjust_saturation, rng.uniform(max(0.0, 1 - a.saturation), 1 + a.saturation)),
                (TF.adjust_hue, rng.uniform(-a.hue, a.hue)),
            ]
            rng.shuffle(ops)  # torchvision's ColorJitter applies its four ops in random order
            for fn, factor in ops:
                img = fn(img, factor)
        if rng.random() < a.grayscale_prob:
            img = ImageOps.grayscale(img).convert("RGB")
        if rng.random() < blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < solarize_prob:
            img = ImageOps.solarize(img, threshold=128)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> list[torch.Tensor]:
        d, a = self.d, self.a
        img = img.convert("RGB")
        g1 = self.crop(rng, img, d.global_crop_size, d.global_crops_scale)
        g2 = self.crop(rng, img, d.global_crop_size, d.global_crops_scale)
        crops = [self.photometric(rng, g1, a.blur_prob_global1, 0.0),
                 self.photometric(rng, g2, a.blur_prob_global2, a.solarize_prob_global2)]
        for _ in range(d.local_crops_number):
            c = self.crop(rng, img, d.local_crop_size, d.local_crops_scale)
            crops.append(self.photometric(rng, c, a.blur_prob_local, 0.0))
        return crops

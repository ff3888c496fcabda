"""Multi-crop augmentation of method.md ("Augmentations"), driven by an explicit per-sample RNG.

Each sample's randomness comes from random.Random(f"{seed}-{epoch}-{index}"), so a sample gets
the same crops whatever the rank, worker count or resume point. All random draws of one crop
(its box, then its photometric parameters) are made up front (`draw_crop`), which lets the
decoder pick a reduced JPEG scale (draft mode) that still serves every crop, and lets
`data.gpu_augment` ship the photometric parameters to the device instead of applying them here.

Crops leave the worker as uint8 [3, H, W] tensors; normalisation happens batched in
`prepare()` (massl/data/batch.py). The ops follow torchvision's PIL functions that the published
recipe uses, in the same order and with the same parameter distributions (docs/data.md lists the
rounding-level differences).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter

from ..config import AugConfig, DataConfig
from ..image import to_rgb

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision ColorJitter's op ids 0..3
# One row of photometric parameters per crop, the device-side contract of gpu_augment.py.
PARAM_NAMES = ("flip", "jitter", "brightness", "contrast", "saturation", "hue",
               "order0", "order1", "order2", "order3", "gray", "blur_sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
# JPEG DCT scalings used by draft mode. libjpeg also offers 1/8, but that keeps only each 8x8
# block's mean, visibly coarser than the bicubic resize it would replace.
DRAFT_FACTORS = (4, 2)
# What PIL raises for an unreadable image; a sample that raises one is replaced and counted.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
SOLARIZE_LUT = [i if i < 128 else 255 - i for i in range(256)] * 3  # PIL ImageOps.solarize(threshold=128)


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
        p.blur_sigma = rng.uniform(0.1, 2.0)
    p.solarize = rng.random() < view.solarize_prob
    return p


def draft_factor(crops: list[CropParams], sizes: list[int]) -> int:
    """Largest JPEG downscale after which every crop box still spans at least its output size,
    so a reduced decode never makes a crop upsample where the full decode would not."""
    smallest = min(min(p.box[2], p.box[3]) / s for p, s in zip(crops, sizes))
    return next((f for f in DRAFT_FACTORS if smallest >= f), 1)


# PIL's convert(matrix) rounds; the Image.blend behind torchvision's PIL jitter truncates. Shifting
# by half a level makes the matrix ops truncate too, so both give the same uint8 values.
TRUNCATE = -0.5


def affine_matrix(scale: float, offset: float) -> tuple:
    """RGB convert() matrix of clip(trunc(scale * x + offset)) on every channel (C speed, no LUT build)."""
    offset += TRUNCATE
    return (scale, 0.0, 0.0, offset, 0.0, scale, 0.0, offset, 0.0, 0.0, scale, offset)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    # PIL's ImageEnhance.Contrast (used by torchvision): blend with the rounded mean of the L image.
    hist = np.asarray(img.convert("L").histogram(), dtype=np.float64)
    mean = int(hist @ np.arange(256) / hist.sum() + 0.5)
    return img.convert("RGB", affine_matrix(factor, (1 - factor) * mean))


def saturation_matrix(factor: float) -> tuple:
    """RGB matrix of blend(grayscale(img), img, factor), as PIL's ImageEnhance.Color (ITU-R 601 luma)."""
    w = (0.299, 0.587, 0.114)
    rows = [[(1 - factor) * w[j] + (factor if i == j else 0.0) for j in range(3)] + [TRUNCATE] for i in range(3)]
    return tuple(x for row in rows for x in row)


_HUE_LEVELS = np.arange(256)
_CHANNEL_HUES = np.array([0.0, 1 / 3, 2 / 3])  # hues (turns) where R, G, B peak


def hue_weights(shift: int) -> np.ndarray:
    """[3, 256] uint8: per hue, how far below V each channel sits, as a fraction of the chroma (x255)."""
    hue = ((_HUE_LEVELS + shift) % 256) / 255.0  # PIL reads its 8-bit hue as h / 255 turns
    x = ((hue[None, :] - _CHANNEL_HUES[:, None]) % 1.0) * 6.0  # sextants from the channel's peak
    return np.round(255 * np.clip(np.minimum(x, 6 - x) - 1, 0, 1)).astype(np.uint8)


def adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL adjust_hue (shift PIL's 8-bit HSV hue with wrap-around). The way back to
    RGB, channel = V * (1 - S * weight(H + shift) / 255^2), runs as PIL 8-bit channel ops: about
    2/3 of the time of PIL's float HSV -> RGB conversion, within one level of it."""
    h, s, v = img.convert("HSV").split()
    return Image.merge("RGB", [ImageChops.multiply(v, ImageChops.invert(ImageChops.multiply(s, h.point(w.tolist()))))
                               for w in hue_weights(int(hue * 255))])


def color_jitter(img: Image.Image, jitter: tuple) -> Image.Image:
    order, brightness, contrast, saturation, hue = jitter
    for op in order:
        if op == 0:
            img = img.convert("RGB", affine_matrix(brightness, 0.0))
        elif op == 1:
            img = adjust_contrast(img, contrast)
        elif op == 2:
            img = img.convert("RGB", saturation_matrix(saturation))
        else:
            img = adjust_hue(img, hue)
    return img


def photometric(img: Image.Image, p: CropParams) -> Image.Image:
    """Flip, colour jitter, grayscale, blur, solarise: the order of the published recipe."""
    if p.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if p.jitter is not None:
        img = color_jitter(img, p.jitter)
    if p.gray:
        img = img.convert("L").convert("RGB")
    if p.blur_sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        img = img.point(SOLARIZE_LUT)
    return img


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (a channels-last view of one copy of the pixels)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def resized_crop(src: torch.Tensor, box: tuple, size: int, mode: str) -> torch.Tensor:
    """Crop box (left, top, right, bottom) of a uint8 [3, H, W] image, resize to size x size.

    torch's antialiased uint8 resampling reproduces PIL's resize (same filters, within a
    level or so) at about 5x its speed on one core."""
    left, top, right, bottom = (int(round(v)) for v in box)
    crop = src[:, top:max(bottom, top + 1), left:max(right, left + 1)].unsqueeze(0)
    # Channels-last in, channels-last out: torch's fast uint8 path, and a free view as an HWC image.
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode=mode, antialias=True)[0]


class MultiCropAugmentation:
    """PIL image (opened, not necessarily decoded) -> V uint8 crops [3, H, W] and, with
    `photometric_on_device`, the V x NUM_PARAMS parameter rows that gpu_augment.py applies."""

    def __init__(self, d: DataConfig, photometric_on_device: bool = False):
        self.d, self.a = d, d.aug
        self.on_device = photometric_on_device
        self.mode = self.a.interpolation  # bicubic | bilinear (torch modes; antialiased like PIL)
        a = self.a
        glob = (d.global_crop_size, tuple(d.global_crops_scale))
        self.views = [ViewSpec(*glob, a.blur_prob_global1, 0.0), ViewSpec(*glob, a.blur_prob_global2, a.solarize_prob_global2)]
        self.views += [ViewSpec(d.local_crop_size, tuple(d.local_crops_scale), a.blur_prob_local, 0.0)] * d.local_crops_number

    @property
    def num_views(self) -> int:
        return len(self.views)

    def draw(self, rng: random.Random, width: int, height: int) -> list[CropParams]:
        return [draw_crop(rng, self.a, width, height, v) for v in self.views]

    def decode(self, img: Image.Image, crops: list[CropParams]) -> Image.Image:
        """Decode as RGB, at the smallest JPEG scale that still serves every crop (draft mode)."""
        if img.format == "JPEG":
            f = draft_factor(crops, [v.size for v in self.views])
            if f > 1:
                img.draft("RGB", (img.width // f, img.height // f))  # PIL picks the scale whose size covers this
        return to_rgb(img)

    def crop(self, img: Image.Image, pixels: torch.Tensor, p: CropParams, size: int, sx: float, sy: float):
        if p.angle:
            pixels = to_uint8_tensor(img.rotate(p.angle, resample=Image.BILINEAR))
        left, top, w, h = p.box
        return resized_crop(pixels, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), size, self.mode)

    def __call__(self, img: Image.Image, rng: random.Random):
        """-> (V uint8 tensors, [V, NUM_PARAMS] float tensor or None)."""
        width, height = img.size
        crops = self.draw(rng, width, height)
        decoded = self.decode(img, crops)
        sx, sy = decoded.width / width, decoded.height / height
        pixels = to_uint8_tensor(decoded)
        out = []
        for p, v in zip(crops, self.views):
            c = self.crop(decoded, pixels, p, v.size, sx, sy)
            out.append(c if self.on_device else to_uint8_tensor(photometric(to_pil(c), p)))
        params = torch.tensor([p.as_row() for p in crops], dtype=torch.float32) if self.on_device else None
        return out, params

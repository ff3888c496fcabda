"""Multi-crop augmentation of method.md ("Augmentations"), driven by an explicit per-sample RNG.

Each sample's randomness comes from random.Random(f"{seed}-{epoch}-{index}"), so a sample gets
the same crops whatever the rank, worker count or resume point. All random draws of one crop
(its box, then its photometric parameters) are made up front (`draw_crop`), which lets the
decoder pick a reduced JPEG scale (draft mode) that still serves every crop, and lets
`data.gpu_augment` ship the photometric parameters to the device instead of applying them here.

Crops leave the worker as uint8 [3, H, W] tensors; normalisation happens batched in
`prepare()` (massl/data/batch.py). The photometric ops run in the worker (cpu_augment.py,
OpenCV) or batched on the device (gpu_augment.py), in the published recipe's order and with its
parameter distributions (docs/data.md lists the rounding-level differences). With
data.decode=device the worker stops after drawing: it sends the JPEG bytes and the crop boxes,
and device_decode.py decodes, crops and resizes on the device.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import simplejpeg  # optional (requirements.txt pins it): PIL decodes the same JPEGs, a bit slower
except ImportError:
    simplejpeg = None

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
JPEG_END = b"\xff\xd9"  # EOI marker: a JPEG cut short lacks it


class AugmentationError(RuntimeError):
    """An augmentation of a decoded image failed: never counted as an unreadable image."""


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


def param_rows(crops: list[CropParams]) -> torch.Tensor:
    """[V, NUM_PARAMS]: the rows gpu_augment.py applies."""
    return torch.tensor([p.as_row() for p in crops], dtype=torch.float32)


def draft_factor(crops: list[CropParams], sizes: list[int]) -> int:
    """Largest JPEG downscale after which every crop box still spans at least its output size,
    so a reduced decode never makes a crop upsample where the full decode would not."""
    smallest = min(min(p.box[2], p.box[3]) / s for p, s in zip(crops, sizes))
    return next((f for f in DRAFT_FACTORS if smallest >= f), 1)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (a channels-last view of one copy of the pixels)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def resized_crop(src: torch.Tensor, box: tuple, size: int, mode: str) -> torch.Tensor:
    """Crop box (left, top, right, bottom) of a uint8 [3, H, W] image, resize to size x size.

    torch's antialiased uint8 resampling reproduces PIL's resize (same filters, within a
    level or so) at about 5x its speed on one core."""
    left, top, right, bottom = (int(round(v)) for v in box)
    crop = src[:, top:max(bottom, top + 1), left:max(right, left + 1)].unsqueeze(0)
    # Channels-last in, channels-last out: torch's fast uint8 path, and a free view as an HWC image.
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode=mode, antialias=True)[0]


class Encoded(NamedTuple):
    """data.decode=device: what a worker sends instead of crops."""

    data: bytes  # the JPEG file
    boxes: list  # V crop boxes (left, top, width, height) in its full-resolution pixels


class Views(NamedTuple):
    """One sample's worker output."""

    crops: Optional[list]  # V uint8 tensors [3, H, W]; None when the device decodes (`encoded`)
    params: Optional[torch.Tensor]  # [V, NUM_PARAMS] when the photometric ops run on the device
    encoded: Optional[Encoded] = None
    fallback: bool = False  # data.decode=device, but this sample took the CPU path (not a plain JPEG)


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """An RGB or grayscale JPEG that ends with its EOI marker: what the device decoders take.
    The rest (other formats, CMYK, files cut short) take the CPU path."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(JPEG_END)


class MultiCropAugmentation:
    """One image -> V crops: uint8 [3, H, W] tensors, fully augmented in the worker or, with
    `photometric_on_device`, only cropped and sent with the V x NUM_PARAMS parameter rows that
    gpu_augment.py applies; with data.decode=device, JPEGs are not even decoded here (`load`)."""

    def __init__(self, d: DataConfig, photometric_on_device: bool = False):
        self.d, self.a = d, d.aug
        self.decode_on_device = d.decode == "device"
        self.on_device = photometric_on_device or self.decode_on_device
        if not self.on_device:
            from . import cpu_augment  # OpenCV: imported where it is used, with a clear error when missing

            self.photometric = cpu_augment.photometric
        self.mode = self.a.interpolation  # bicubic | bilinear (torch modes; antialiased like PIL)
        a = self.a
        glob = (d.global_crop_size, tuple(d.global_crops_scale))
        self.views = [ViewSpec(*glob, a.blur_prob_global1, 0.0), ViewSpec(*glob, a.blur_prob_global2, a.solarize_prob_global2)]
        self.views += [ViewSpec(d.local_crop_size, tuple(d.local_crops_scale), a.blur_prob_local, 0.0)] * d.local_crops_number

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def sizes(self) -> list[int]:
        return [v.size for v in self.views]

    def draw(self, rng: random.Random, width: int, height: int) -> list[CropParams]:
        return [draw_crop(rng, self.a, width, height, v) for v in self.views]

    def decode(self, img: Image.Image, crops: list[CropParams], data: Optional[bytes] = None) -> torch.Tensor:
        """uint8 RGB [3, H, W], at the smallest JPEG scale that still serves every crop (libjpeg's
        DCT scaling). An RGB or grayscale JPEG whose bytes are at hand goes through simplejpeg:
        the same libjpeg-turbo decode as PIL's, same pixels, about a third less CPU."""
        f = draft_factor(crops, self.sizes) if img.format == "JPEG" else 1
        if data is not None and simplejpeg is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=img.height // f, min_width=img.width // f)
            return torch.from_numpy(pixels).permute(2, 0, 1)
        if f > 1:
            img.draft("RGB", (img.width // f, img.height // f))  # PIL picks the scale whose size covers this
        return to_uint8_tensor(to_rgb(img))

    def crop(self, pixels: torch.Tensor, p: CropParams, size: int, sx: float, sy: float) -> torch.Tensor:
        if p.angle:
            rotated = Image.fromarray(pixels.permute(1, 2, 0).numpy()).rotate(p.angle, resample=Image.BILINEAR)
            pixels = to_uint8_tensor(rotated)
        left, top, w, h = p.box
        return resized_crop(pixels, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), size, self.mode)

    def cropped(self, img: Image.Image, crops: list[CropParams], data: Optional[bytes] = None) -> list[torch.Tensor]:
        """Decode `img` (whose encoded bytes are `data`, when at hand) and cut the V crops, before
        any photometric op."""
        width, height = img.size  # before draft mode shrinks it
        pixels = self.decode(img, crops, data)
        sx, sy = pixels.shape[2] / width, pixels.shape[1] / height
        return [self.crop(pixels, p, v.size, sx, sy) for p, v in zip(crops, self.views)]

    def apply(self, img: Image.Image, crops: list[CropParams], data: Optional[bytes] = None):
        """-> (V uint8 tensors, [V, NUM_PARAMS] float tensor or None)."""
        out = self.cropped(img, crops, data)
        if self.on_device:
            return out, param_rows(crops)
        # cpu_augment works on the HWC view of each channels-last crop
        try:
            return [torch.from_numpy(self.photometric(c.permute(1, 2, 0).numpy(), p)).permute(2, 0, 1)
                    for c, p in zip(out, crops)], None
        except DECODE_ERRORS as e:  # the image decoded: not an unreadable image, a bug or a bad setting
            raise AugmentationError(f"photometric augmentation failed ({type(e).__name__}: {e}); check data.aug") from e

    def __call__(self, img: Image.Image, rng: random.Random):
        """PIL image (opened, not necessarily decoded) -> (crops, params) as `apply`."""
        return self.apply(img, self.draw(rng, *img.size))

    def load(self, data: bytes, rng: random.Random) -> Views:
        """An encoded image file -> its Views. With data.decode=device a JPEG is only parsed up to
        its size, for the crop draws; anything else goes through the CPU path, flagged as fallback."""
        with Image.open(io.BytesIO(data)) as img:
            crops = self.draw(rng, *img.size)
            if not self.decode_on_device:
                return Views(*self.apply(img, crops, data))
            if device_decodable(img, data):
                return Views(None, param_rows(crops), Encoded(data, [p.box for p in crops]))
            return Views(*self.apply(img, crops, data), fallback=True)

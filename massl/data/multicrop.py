"""Multi-crop augmentation of method.md ("Augmentations"), driven by an explicit per-sample RNG.

All random draws of one crop (its box, then its photometric parameters) are made up front
(augment/draw.py), which lets the decoder pick a reduced JPEG scale (draft mode) that still
serves every crop, and lets `data.gpu_augment` ship the photometric parameters to the device
instead of applying them here.

Crops leave the worker as uint8 [3, H, W] tensors; normalisation happens batched in
`prepare()` (massl/data/batch.py). The photometric ops run in the worker (augment/cpu.py,
OpenCV) or batched on the device (augment/device.py), in the published recipe's order and with its
parameter distributions (docs/data.md lists the rounding-level differences). With
data.decode=device the worker stops after drawing: it sends the JPEG bytes and the crop boxes,
and device_decode.py decodes, crops and resizes on the device.
"""
from __future__ import annotations

import io
import random
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import simplejpeg  # optional (requirements.txt pins it): PIL decodes the same JPEGs, a bit slower
except ImportError:
    simplejpeg = None

from ..config import DataConfig
from ..image import exif_orientation, oriented_size, to_rgb
from .augment.draw import CropParams, ViewSpec, draw_crop, param_rows, sample_rng  # noqa: F401 (sample_rng: the sources' name)

# JPEG DCT scalings used by draft mode. libjpeg also offers 1/8, but that keeps only each 8x8
# block's mean, visibly coarser than the bicubic resize it would replace.
DRAFT_FACTORS = (4, 2)
DRAFT_MAX_SHIFT = 1.0  # output pixels a crop box may move by being rounded on the reduced grid
# What PIL raises for an unreadable image; a sample that raises one is replaced and counted.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
JPEG_END = b"\xff\xd9"  # EOI marker: a JPEG cut short lacks it


def draft_shift(p: CropParams, size: int, f: int, width: int, height: int) -> float:
    """How far, in output pixels, the crop box moves when it is rounded to whole pixels of the
    image decoded at 1/f (libjpeg's scaled size: ceil(width / f) x ceil(height / f))."""
    sx, sy = -(-width // f) / width, -(-height // f) / height
    left, top, w, h = p.box
    dx = max(abs(round(v * sx) / sx - v) for v in (left, left + w)) * size / w
    dy = max(abs(round(v * sy) / sy - v) for v in (top, top + h)) * size / h
    return max(dx, dy)


class AugmentationError(RuntimeError):
    """An augmentation of a decoded image failed: never counted as an unreadable image."""


def draft_factor(crops: list[CropParams], sizes: list[int], width: int, height: int) -> int:
    """Largest JPEG downscale after which every crop box still spans at least its output size (a
    reduced decode never makes a crop upsample where the full decode would not) and, rounded to
    whole pixels of the reduced image, stays within DRAFT_MAX_SHIFT output pixels of its
    full-resolution box."""
    smallest = min(min(p.box[2], p.box[3]) / s for p, s in zip(crops, sizes))
    return next((f for f in DRAFT_FACTORS if smallest >= f
                 and max(draft_shift(p, s, f, width, height) for p, s in zip(crops, sizes)) <= DRAFT_MAX_SHIFT), 1)


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
    """An RGB or grayscale JPEG that ends with its EOI marker and is stored upright: what the
    device decoders take (nvJPEG ignores the EXIF orientation). The rest (other formats, CMYK,
    files cut short, EXIF-rotated photos) take the CPU path."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(JPEG_END)
            and exif_orientation(img) == 1)


# EXIF orientation -> what turns the stored pixels [..., H, W] upright (PIL's exif_transpose)
ORIENT = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),  # mirrored left-right
    3: lambda x: x.flip(-1).flip(-2),  # rotated 180
    4: lambda x: x.flip(-2),  # mirrored top-bottom
    5: lambda x: x.transpose(-1, -2),  # transposed
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # stored 90 degrees counter-clockwise
    7: lambda x: x.flip(-1).flip(-2).transpose(-1, -2),  # transversed
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # stored 90 degrees clockwise
}


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """uint8 [3, H, W] as stored -> as shown, for EXIF orientation 1-8."""
    return ORIENT[orientation](pixels).contiguous()


class MultiCropAugmentation:
    """One image -> V crops: uint8 [3, H, W] tensors, fully augmented in the worker or, with
    `photometric_on_device`, only cropped and sent with the V x NUM_PARAMS parameter rows that
    augment/device.py applies; with data.decode=device, JPEGs are not even decoded here (`load`)."""

    def __init__(self, d: DataConfig, photometric_on_device: bool = False):
        self.d, self.a = d, d.aug
        self.decode_on_device = d.decode == "device"
        self.on_device = photometric_on_device or self.decode_on_device
        if not self.on_device:
            from .augment import cpu  # OpenCV: imported where it is used, with a clear error when missing

            self.photometric = cpu.photometric
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
        f = draft_factor(crops, self.sizes, *img.size) if img.format == "JPEG" and self.d.draft_decode else 1
        return self.decode_scaled(img, f, data)

    def decode_scaled(self, img: Image.Image, f: int, data: Optional[bytes] = None) -> torch.Tensor:
        """uint8 RGB [3, H, W] of `img` decoded at about 1/f of its size (JPEG DCT scaling; f = 1
        for other formats), by the CPU path's decoder: simplejpeg (strict: libjpeg-turbo's warnings
        about corrupt data are errors) or PIL."""
        if data is not None and simplejpeg is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=img.height // f, min_width=img.width // f)
            return torch.from_numpy(pixels).permute(2, 0, 1)
        if f > 1:
            img.draft("RGB", (img.width // f, img.height // f))  # PIL picks the scale whose size covers this
        return to_uint8_tensor(to_rgb(img))

    def crop(self, pixels: torch.Tensor, p: CropParams, size: int, sx: float, sy: float) -> torch.Tensor:
        if p.angle:
            image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            rotated = image.rotate(p.angle, resample=Image.Resampling.BILINEAR)
            pixels = to_uint8_tensor(rotated)
        left, top, w, h = p.box
        return resized_crop(pixels, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), size, self.mode)

    def cropped(self, img: Image.Image, crops: list[CropParams], data: Optional[bytes] = None) -> list[torch.Tensor]:
        """Decode `img` (whose encoded bytes are `data`, when at hand) and cut the V crops, before
        any photometric op."""
        width, height = oriented_size(img)  # before draft mode shrinks it; the crops are drawn on it
        pixels = orient(self.decode(img, crops, data), exif_orientation(img))
        sx, sy = pixels.shape[2] / width, pixels.shape[1] / height
        return [self.crop(pixels, p, v.size, sx, sy) for p, v in zip(crops, self.views)]

    def apply(self, img: Image.Image, crops: list[CropParams],
              data: Optional[bytes] = None) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """-> (V uint8 tensors, [V, NUM_PARAMS] float tensor or None)."""
        out = self.cropped(img, crops, data)
        if self.on_device:
            return out, param_rows(crops)
        # augment/cpu.py works on the HWC view of each channels-last crop
        try:
            return [torch.from_numpy(self.photometric(c.permute(1, 2, 0).numpy(), p)).permute(2, 0, 1)
                    for c, p in zip(out, crops)], None
        except DECODE_ERRORS as e:  # the image decoded: not an unreadable image, a bug or a bad setting
            raise AugmentationError(f"photometric augmentation failed ({type(e).__name__}: {e}); check data.aug") from e

    def __call__(self, img: Image.Image, rng: random.Random):
        """PIL image (opened, not necessarily decoded) -> (crops, params) as `apply`."""
        return self.apply(img, self.draw(rng, *oriented_size(img)))

    def load(self, data: bytes, rng: random.Random) -> Views:
        """An encoded image file -> its Views. With data.decode=device a JPEG is only parsed up to
        its size, for the crop draws; anything else goes through the CPU path, flagged as fallback."""
        with Image.open(io.BytesIO(data)) as img:
            crops = self.draw(rng, *oriented_size(img))
            if not self.decode_on_device:
                return Views(*self.apply(img, crops, data))
            if device_decodable(img, data):
                # The device decoders accept JPEGs whose data libjpeg-turbo calls corrupt (a cut body,
                # noise, a stray marker) and decode them to grey or smeared pixels. The CPU path's own
                # decode at 1/8 scale (every coefficient is still entropy-decoded, so the same errors
                # and warnings, at a fraction of a full decode's cost) refuses them here: the sample
                # is replaced and counted exactly as on the CPU path.
                self.decode_scaled(img, 8, data)
                return Views(None, param_rows(crops), Encoded(data, [p.box for p in crops]))
            return Views(*self.apply(img, crops, data), fallback=True)

"""Any PIL image -> the 8-bit RGB pixels a person sees: one conversion for training (massl/data),
evaluation (massl/eval) and massl-shard's re-encoding.

PIL's `convert("RGB")` is right for RGB, L, 1-bit, palette without transparency, CMYK and YCbCr
images, but not for the others: it clips 16-bit and 32-bit values at 255 (a 16-bit PNG turns
solid white), and it drops transparency, showing whatever colour the transparent pixels or
palette entry happen to hold. Here:

- 16-bit modes (I;16, I;16B, ...) and 32-bit integers (I, as which PIL opens some 16-bit files)
  are scaled from 0..65535 to 0..255 (round(v / 257); I is clipped to 0..65535 first);
- 32-bit floats (F) are read as 0..1 (clipped) and scaled to 0..255;
- transparency (RGBA, LA, premultiplied RGBa/La, PA, and palette or grey images with a
  transparent colour) is composited over white, the background of a page.

The EXIF orientation (a camera's "this side up", in JPEG, TIFF, WebP and PNG files) is applied
in every decode path, so that every tool sees the image as a viewer shows it: `upright` here
(evaluation, massl-shard, massl-report), `exif_orientation` + `oriented_size` for the training
decode, which turns the decoded pixels itself (massl/data/multicrop.py).

Only PIL and numpy: massl-shard's worker processes import this without torch.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # under transparent pixels


def _grey8(values: np.ndarray, scale: float, top: float) -> Image.Image:
    """clip(values, 0, top) * scale, rounded, as an 8-bit grey image."""
    return Image.fromarray(np.rint(np.clip(values, 0, top) * scale).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as an RGB image of what it shows (see the module docstring); RGB images are returned as-is."""
    mode, transparent = img.mode, "transparency" in img.info
    if mode == "RGB" and not transparent:
        return img
    if mode.startswith("I;16") or mode == "I":
        return _grey8(np.asarray(img, dtype=np.float64), 255 / 65535, 65535).convert("RGB")
    if mode == "F":
        return _grey8(np.asarray(img, dtype=np.float64), 255, 1).convert("RGB")
    if transparent and mode in ("P", "L", "RGB") or mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), img).convert("RGB")
    return img.convert("RGB")


ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright; 2-8 mirrored and/or rotated (5-8 swap width and height)


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, 1 when it has none (or an invalid one)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: the pixels are still usable, upright as stored
        return 1
    return value if value in range(1, 9) else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as a viewer shows it."""
    w, h = img.size
    return (h, w) if exif_orientation(img) >= 5 else (w, h)


def upright(img: Image.Image) -> Image.Image:
    """The image with its EXIF orientation applied (the image itself when it has none)."""
    return img if exif_orientation(img) == 1 else ImageOps.exif_transpose(img)

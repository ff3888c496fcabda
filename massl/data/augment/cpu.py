"""Photometric half of the multi-crop recipe in the DataLoader workers (data.gpu_augment off).

Flip, colour jitter in the crop's own op order, grayscale, Gaussian blur and solarise on one
uint8 HWC crop, with OpenCV's SIMD kernels: about 5x cheaper per crop than the PIL functions
the published recipe calls (benchmarks/bench_data.py measures both). The definitions are
torchvision's (docs/data.md, "Augmentation", lists the rounding-level differences):

- brightness, contrast and saturation are PIL's Image.blend (brightness and contrast as
  256-entry lookup tables), with OpenCV's 8-bit RGB -> L conversion, which differs from PIL's
  by one level in about 0.1 % of pixels;
- hue shifts OpenCV's 8-bit HSV hue (256 steps per turn), closer to the exact float rotation
  of torchvision's tensor op than PIL's 8-bit HSV (255 steps per turn) that the PIL op uses;
- blur is PIL's GaussianBlur: three box blurs per axis (draw.blur_box, shared with device.py)
  whose variance is sigma^2 at every sigma, edges replicated, in float32 and rounded once
  where PIL rounds after each pass.
"""
from __future__ import annotations

import numpy as np

try:
    import cv2
except ImportError as e:  # an install without the pinned requirements
    raise ImportError("massl's CPU augmentation (data.gpu_augment=false, or auto without a GPU) needs OpenCV: "
                      "pip install opencv-python-headless (requirements.txt pins the tested version)") from e

from .draw import BLUR_PASSES, CropParams, blur_box

# One thread per DataLoader worker, as torch runs its own ops there: the workers are the parallelism.
cv2.setNumThreads(1)

LEVELS = np.arange(256, dtype=np.float32)
SOLARIZE_LUT = np.where(LEVELS < 128, LEVELS, 255 - LEVELS).astype(np.uint8)  # PIL ImageOps.solarize(128)
HUE_STEPS = 256  # OpenCV's *_FULL HSV conversions keep the hue as 256 steps per turn
# cv2.addWeighted rounds (half to even); PIL's Image.blend truncates. Just under half a level
# down makes it truncate too, integers included (float32 error at 255 is ~1e-5 levels).
TRUNCATE = -0.5 + 1e-3


def blend_lut(factor: float, degenerate: float) -> np.ndarray:
    """PIL's Image.blend(degenerate, img, factor) per level: float32 arithmetic, clipped, truncated."""
    d = np.float32(degenerate)
    return np.clip(d + np.float32(factor) * (LEVELS - d), 0, 255).astype(np.uint8)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(x, blend_lut(factor, 0.0))


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    # PIL's ImageEnhance.Contrast: blend with the rounded mean of the L image.
    mean = int(cv2.mean(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY))[0] + 0.5)
    return cv2.LUT(x, blend_lut(factor, mean))


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    # PIL's ImageEnhance.Color: blend with the L image.
    gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(x, factor, gray, 1 - factor, TRUNCATE)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by `shift` turns (uint8 hue arithmetic wraps around the circle)."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(shift * HUE_STEPS) % HUE_STEPS)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # op ids 0..3 (draw.JITTER_OPS)


ONE_TAP = np.ones(1, np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """PIL's GaussianBlur(sigma): its box passes along x, then along y, rounded once at the end."""
    box = np.trim_zeros(blur_box(sigma)).astype(np.float32)  # symmetric: stays centred
    y: np.ndarray = x.astype(np.float32)  # float32 here; cv2's stub types sepFilter2D's result more loosely
    for kx, ky in [(box, ONE_TAP)] * BLUR_PASSES + [(ONE_TAP, box)] * BLUR_PASSES:
        y = cv2.sepFilter2D(y, -1, kx, ky, borderType=cv2.BORDER_REPLICATE)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def photometric(x: np.ndarray, p: CropParams) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: flip, colour jitter, grayscale, blur, solarise (the recipe's order)."""
    if p.flip:
        x = cv2.flip(x, 1)
    if p.jitter is not None:
        order, *factors = p.jitter
        for op in order:
            x = JITTER[op](x, factors[op])
    gray = p.gray
    if gray:  # one channel through blur and solarise, widened at the end
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    if p.blur_sigma > 0:
        x = gaussian_blur(x, p.blur_sigma)
    if p.solarize:
        x = cv2.LUT(x, SOLARIZE_LUT)
    return cv2.cvtColor(x, cv2.COLOR_GRAY2RGB) if gray else x

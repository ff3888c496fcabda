"""Photometric half of the multi-crop recipe, batched on the device (data.gpu_augment=true).

The workers decode, crop and resize to uint8 only, and send each crop's parameter row (drawn
by `draw.draw_crop` from the sample's own RNG, so a sample gets the same random choices
whether its photometric ops run here or in the worker). Here, per view, on [B, 3, H, W]:
flip, colour jitter in each sample's own op order, grayscale, Gaussian blur, solarise,
normalise. Index lists come from the CPU copy of the parameters, so no step waits on the
device. The ops work on float32 levels 0..255 and round as the published recipe's PIL ops do
(truncated blends, PIL's integer luma, one rounding after the blur), so each op's output is
PIL's within a level (tests/test_data_augment.py states the bound per op); only the hue
rotation is the exact float one, rounded to the nearest level (PIL quantises its hue to 255
steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .draw import BLUR_PASSES, COL, JITTER_OPS, blur_boxes

# PIL's L conversion (ITU-R 601 in 16-bit fixed point, rounded): (R*19595 + G*38470 + B*7471 + 2**15) >> 16.
# Exact in float32: the largest sum, 255 * 2**16 + 2**15, is below 2**24.
LUMA_FIXED = (19595.0, 38470.0, 7471.0)
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize(threshold=128): levels >= 128 are inverted


def normalize(x: torch.Tensor, mean, std, max_value: float = 255.0) -> torch.Tensor:
    """[..., 3, H, W] in [0, max_value] (uint8 or float) -> float32 (x / max_value - mean) / std, one fused pass."""
    scale = torch.tensor([1.0 / (max_value * s) for s in std], device=x.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=x.device).view(3, 1, 1)
    return torch.addcmul(-shift, x.float(), scale)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] levels -> [N, 1, H, W] PIL luma (whole levels)."""
    w = torch.tensor(LUMA_FIXED, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return torch.floor_(((x * w).sum(1, keepdim=True) + 32768) / 65536)


def per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def blend(x: torch.Tensor, degenerate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, f) on levels: float32, clipped, truncated."""
    return torch.floor_((degenerate + per_sample(f) * (x - degenerate)).clamp_(0, 255))


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, torch.zeros((), device=x.device, dtype=x.dtype), f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # PIL's ImageEnhance.Contrast: blend with the mean of the L image, rounded to a level
    mean = torch.floor_(grayscale(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    return blend(x, mean, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), f)  # PIL's ImageEnhance.Color: blend with the L image


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value; rounded to levels."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sextant = torch.where(maxc == r, (g - b) / safe,
                          torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue6 = torch.remainder(sextant + 6 * shift.view(-1, 1, 1), 6.0)  # hue in sextants, [0, 6)
    # HSV -> RGB: channel n (R 5, G 3, B 1) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + hue6) mod 6.
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue6 + n, 6.0)
        out.append(maxc - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1).round_()


def gaussian_blur(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur per sample: its box passes ([N, taps], draw.blur_boxes) along x, then
    along y, edges replicated as PIL does, rounded once to levels."""
    n, c, h, w = x.shape
    taps = boxes.shape[1]
    r = taps // 2
    box = boxes.to(x.dtype).repeat_interleave(c, 0).view(n * c, 1, 1, taps)  # one box per channel
    y = x.reshape(1, n * c, h, w)
    for _ in range(BLUR_PASSES):
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), box, groups=n * c)
    box = box.view(n * c, 1, taps, 1)
    for _ in range(BLUR_PASSES):
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), box, groups=n * c)
    return y.view(n, c, h, w).round_().clamp_(0, 255)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 255 - x, x)


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # op ids 0..3 (draw.JITTER_OPS)


class GpuAugment:
    """(uint8 crops [B, 3, H, W] on the device, parameter rows [B, P] on the CPU) -> normalised float."""

    def __init__(self, mean, std):
        self.mean, self.std = list(mean), list(std)

    @staticmethod
    def _apply(x: torch.Tensor, rows: torch.Tensor, fn, *columns: torch.Tensor) -> torch.Tensor:
        """x[rows] = fn(x[rows], params...) for the selected samples only."""
        if rows.numel() == 0:
            return x
        idx = rows.to(x.device, non_blocking=True)
        args = [a.to(x.device, x.dtype, non_blocking=True) for a in columns]
        return x.index_copy(0, idx, fn(x.index_select(0, idx), *args))

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = params.cpu()
        x = crops.float()  # levels 0..255, as the PIL ops see them

        def where(mask: torch.Tensor) -> torch.Tensor:
            return mask.nonzero().flatten()

        x = self._apply(x, where(p[:, COL["flip"]] > 0.5), lambda t: t.flip(-1))
        jitter = p[:, COL["jitter"]] > 0.5
        for slot in range(4):  # each sample runs its own random order of the four jitter ops
            op_at_slot = p[:, COL[f"order{slot}"]]
            for op, fn in enumerate(JITTER):
                rows = where(jitter & (op_at_slot == op))
                x = self._apply(x, rows, fn, p[rows, COL[JITTER_OPS[op]]])
        x = self._apply(x, where(p[:, COL["gray"]] > 0.5), lambda t: grayscale(t).expand_as(t))
        rows = where(p[:, COL["blur_sigma"]] > 0)
        x = self._apply(x, rows, gaussian_blur, blur_boxes(p[rows, COL["blur_sigma"]].tolist()))
        x = self._apply(x, where(p[:, COL["solarize"]] > 0.5), solarize)
        return normalize(x, self.mean, self.std)

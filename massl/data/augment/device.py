"""Photometric half of the multi-crop recipe, batched on the device (data.gpu_augment=true).

The workers decode, crop and resize to uint8 only, and send each crop's parameter row (drawn
by `draw.draw_crop` from the sample's own RNG, so a sample gets the same random choices
whether its photometric ops run here or in the worker). Here, per view, on [B, 3, H, W]:
flip, colour jitter in each sample's own op order, grayscale, Gaussian blur, solarise,
normalise. Index lists come from the CPU copy of the parameters, so no step waits on the
device. Float definitions follow torchvision's tensor functions; docs/data.md states where
they differ from the PIL ops of the CPU path (rounding; a true Gaussian where PIL uses three
box blurs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .draw import BLUR_RADIUS, COL, JITTER_OPS

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's L conversion
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128) on the 0..255 scale


def normalize(x: torch.Tensor, mean, std, max_value: float = 255.0) -> torch.Tensor:
    """[..., 3, H, W] in [0, max_value] (uint8 or float) -> float32 (x / max_value - mean) / std, one fused pass."""
    scale = torch.tensor([1.0 / (max_value * s) for s in std], device=x.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=x.device).view(3, 1, 1)
    return torch.addcmul(-shift, x.float(), scale)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = per_sample(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = per_sample(f)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value."""
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
    return torch.stack(out, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian per sample (kernel truncated at 6 taps, reflect padding)."""
    n, c, h, w = x.shape
    radius = min(BLUR_RADIUS, h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, taps]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # op ids 0..3 (draw.JITTER_OPS)


class GpuAugment:
    """(uint8 crops [B, 3, H, W] on the device, parameter rows [B, P] on the CPU) -> normalised float."""

    def __init__(self, mean, std):
        self.mean, self.std = list(mean), list(std)

    @staticmethod
    def _apply(x: torch.Tensor, rows: torch.Tensor, fn, *columns: str) -> torch.Tensor:
        """x[rows] = fn(x[rows], params...) for the selected samples only."""
        if rows.numel() == 0:
            return x
        idx = rows.to(x.device, non_blocking=True)
        args = [a.to(x.device, x.dtype, non_blocking=True) for a in columns]
        return x.index_copy(0, idx, fn(x.index_select(0, idx), *args))

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        p = params.cpu()
        x = crops.float().div_(255)

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
        x = self._apply(x, rows, gaussian_blur, p[rows, COL["blur_sigma"]])
        x = self._apply(x, where(p[:, COL["solarize"]] > 0.5), solarize)
        return normalize(x, self.mean, self.std, max_value=1.0)

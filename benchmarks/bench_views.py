"""View statistics of the multi-crop recipe: the published recipe (torchvision's PIL transforms, as
docs/method.md lists them) beside massl's CPU path (data.gpu_augment=false) and massl's device
path (data.gpu_augment=true, its ops run here on CPU tensors, or on --device), side by side.

Per crop kind (global crop 1: always blurred; global crop 2: blur 0.1, solarise 0.2; local
crops), over every crop drawn from --images images of each photo (scikit-image's bundled photos
as 500x375 JPEGs, q=90): the mean level (0-255), the per-crop standard deviation (contrast) and
the per-crop mean of max(R, G, B) - min(R, G, B) (colourfulness), each as mean +- standard
error. The two massl paths draw the same random choices per sample; the published recipe draws
its own (torch's and Python's RNGs), so only its distribution is comparable: a difference of
more than ~3 standard errors between it and massl is a real difference of the views.

    python benchmarks/bench_views.py --images 100
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_data import make_jpegs, published_recipe  # noqa: E402

from massl.config import DataConfig  # noqa: E402
from massl.data.augment.device import GpuAugment  # noqa: E402
from massl.data.augment.draw import sample_rng  # noqa: E402
from massl.data.multicrop import MultiCropAugmentation  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("global 1", "global 2", "local")
STATS = ("mean level", "contrast (std)", "colourfulness")


def kind(view: int) -> str:
    return KINDS[min(view, 2)]


def crop_stats(levels: torch.Tensor) -> tuple[float, float, float]:
    """float [3, H, W] in 0..255 -> (mean, std, mean of max - min over the channels)."""
    return levels.mean().item(), levels.std().item(), (levels.amax(0) - levels.amin(0)).mean().item()


def published_views(blob: bytes, i: int) -> list[torch.Tensor]:
    torch.manual_seed(i)
    random.seed(i)
    std, mean = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    return [(x * std + mean) * 255 for x in published_recipe()(blob, i)]


def collect(blobs: list[bytes], images: int, device: torch.device) -> dict:
    """{path: {kind: [(mean, std, colourfulness) per crop]}}."""
    cpu = MultiCropAugmentation(DataConfig(gpu_augment="false"))
    dev = MultiCropAugmentation(DataConfig(gpu_augment="true"), photometric_on_device=True)
    augment = GpuAugment([0, 0, 0], [1 / 255] * 3)  # normalise(x) = x: levels out
    out = {p: {k: [] for k in KINDS} for p in ("published (torchvision PIL)", "massl CPU", "massl device")}
    for b, blob in enumerate(blobs):
        for n in range(images):
            i = b * images + n
            paths = {"published (torchvision PIL)": published_views(blob, i),
                     "massl CPU": [c.float() for c in cpu.load(blob, sample_rng(0, 0, i)).crops]}
            views = dev.load(blob, sample_rng(0, 0, i))
            paths["massl device"] = [augment(c.unsqueeze(0).to(device), views.params[v:v + 1])[0].cpu()
                                     for v, c in enumerate(views.crops)]
            for path, crops in paths.items():
                for v, c in enumerate(crops):
                    out[path][kind(v)].append(crop_stats(c))
    return out


def summary(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std() / len(t) ** 0.5).item()


def table(stats: dict) -> str:
    paths = list(stats)
    lines = ["| view | statistic | " + " | ".join(paths) + " |", "| --- | --- | " + " | ".join("---:" for _ in paths) + " |"]
    for k in KINDS:
        for s, name in enumerate(STATS):
            cells = [summary([row[s] for row in stats[p][k]]) for p in paths]
            lines.append(f"| {k} | {name} | " + " | ".join(f"{m:.2f} +- {e:.2f}" for m, e in cells) + " |")
    n = {k: len(stats[paths[0]][k]) for k in KINDS}
    return "\n".join(lines) + "\n(crops per path: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ")"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="draws per photo (each gives 2 global + 10 local crops)")
    p.add_argument("--device", default="cpu", help="where the device path's ops run (cpu, cuda)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = [open(path, "rb").read() for path in make_jpegs(tmp)]
    text = table(collect(blobs, a.images, torch.device(a.device)))
    print(text)
    return text


if __name__ == "__main__":
    main()

"""CPU cost of multi-crop augmentation per image, one process, one thread.

(a) the published recipe built from torchvision's PIL transforms exactly as docs/method.md lists
    them (2 global 224 px + 10 local 96 px crops, bicubic, flip, colour jitter p=0.8, grayscale,
    PIL Gaussian blur, solarise, ToTensor + Normalize), from a full-size JPEG decode;
(b) massl's pipeline (MultiCropAugmentation, data.gpu_augment=false) as a DataLoader worker runs
    it: decode, crops, all photometric ops, uint8 tensors (prepare() normalises on the device);
(b+) the same plus that normalisation to float on this CPU, what a CPU-only run also pays;
(c) the worker side of data.gpu_augment=true (decode, crop, resize to uint8, parameter rows).

Inputs: JPEGs (q=90, about 500x375) made from scikit-image's bundled photos in a temp dir.
Timing is CPU time of this process (time.process_time), so other load on a shared machine
inflates it less than wall time; repetitions are interleaved and the median is reported.

    python benchmarks/bench_data.py --out benchmarks/results/data_cpu.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from massl.config import DataConfig  # noqa: E402
from massl.data.gpu_augment import normalize  # noqa: E402
from massl.data.multicrop import MultiCropAugmentation, sample_rng  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZE = (500, 375)


def make_jpegs(folder: str) -> list[str]:
    import skimage.data

    paths = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        s = max(SIZE[0] / img.width, SIZE[1] / img.height)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        left, top = (img.width - SIZE[0]) // 2, (img.height - SIZE[1]) // 2
        path = os.path.join(folder, f"{name}.jpg")
        img.crop((left, top, left + SIZE[0], top + SIZE[1])).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


class PILGaussianBlur:
    """method.md's blur: PIL GaussianBlur with a radius uniform in [0.1, 2.0] (as the published code)."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def published_recipe():
    bicubic = T.InterpolationMode.BICUBIC
    flip_jitter_gray = [T.RandomHorizontalFlip(0.5),
                        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    normalize = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    glob = [T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic)] + flip_jitter_gray
    g1 = T.Compose(glob + [T.RandomApply([PILGaussianBlur()], p=1.0)] + normalize)
    g2 = T.Compose(glob + [T.RandomApply([PILGaussianBlur()], p=0.1), T.RandomSolarize(128, p=0.2)] + normalize)
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.32), interpolation=bicubic)] + flip_jitter_gray
                      + [T.RandomApply([PILGaussianBlur()], p=0.5)] + normalize)

    def run(data: bytes, i: int):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [g1(img), g2(img)] + [local(img) for _ in range(10)]

    return run


def massl_pipeline(on_device: bool, normalise: bool = False):
    aug = MultiCropAugmentation(DataConfig(), photometric_on_device=on_device)
    mean, std = DataConfig().aug.mean, DataConfig().aug.std

    def run(data: bytes, i: int):
        crops, params = aug(Image.open(io.BytesIO(data)), sample_rng(0, 0, i))
        if normalise:
            return [normalize(c.unsqueeze(0), mean, std) for c in crops]
        return crops, params

    return run


def time_cpu(fn, blobs, n: int) -> float:
    start = time.process_time()
    for i in range(n):
        fn(blobs[i % len(blobs)], i)
    return (time.process_time() - start) / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=140, help="images per repetition and pipeline")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    p.add_argument("--machine", default="", help="description of the machine for the record")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = [open(path, "rb").read() for path in make_jpegs(tmp)]
    pipelines = {"a_published_torchvision": published_recipe(), "b_massl_cpu_worker": massl_pipeline(False),
                 "b+_massl_cpu_with_normalise": massl_pipeline(False, normalise=True),
                 "c_massl_gpu_augment_worker": massl_pipeline(True)}
    for fn in pipelines.values():  # warm-up
        time_cpu(fn, blobs, len(blobs))
    times = {k: [] for k in pipelines}
    for _ in range(args.reps):
        for k, fn in pipelines.items():
            times[k].append(time_cpu(fn, blobs, args.images))
    base = statistics.median(times["a_published_torchvision"])
    rows = {}
    for k, ts in times.items():
        t = statistics.median(ts)
        rows[k] = {"ms_per_image": 1e3 * t, "images_per_s_per_core": 1 / t, "speedup_vs_a": base / t,
                   "ms_per_image_reps": [round(1e3 * x, 3) for x in ts]}
    load = os.getloadavg()
    result = {"machine": args.machine or platform.processor() or platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__,
              "pillow": Image.__version__, "threads": 1, "load_avg_1_5_15": [round(x, 2) for x in load],
              "images": f"{len(blobs)} JPEGs q=90 {SIZE[0]}x{SIZE[1]} from skimage.data ({', '.join(PHOTOS)})",
              "crops": "2 x 224 px (scale 0.32-1) + 10 x 96 px (scale 0.05-0.32)", "results": rows}
    print(f"{'pipeline':30s} {'ms/img':>8s} {'img/s/core':>11s} {'vs (a)':>7s}")
    for k, r in rows.items():
        print(f"{k:30s} {r['ms_per_image']:8.2f} {r['images_per_s_per_core']:11.1f} {r['speedup_vs_a']:6.2f}x")
    print(f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

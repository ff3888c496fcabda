"""Cost of multi-crop augmentation per image: CPU per core, and (with a device) the device side.

CPU rows, one process, one thread, CPU time of the process (time.process_time, so other load on
a shared machine inflates them less than wall time), repetitions interleaved, median reported:
(a)  the published recipe built from torchvision's PIL transforms exactly as docs/method.md lists
     them (2 global 224 px + 10 local 96 px crops, bicubic, flip, colour jitter p=0.8,
     grayscale, PIL Gaussian blur, solarise, ToTensor + Normalize), from a full-size decode;
(b)  massl's CPU path (data.gpu_augment=false) as a DataLoader worker runs it: decode, crops,
     all photometric ops (OpenCV), uint8 tensors; (b+) plus the normalisation to float that
     prepare() does, which a CPU-only run pays on the CPU too;
(c)  the worker side of data.gpu_augment: decode, crop, resize to uint8, parameter rows;
(d)  the worker side of data.decode=device: header, crop draws, the JPEG's bytes.
Candidates: the CPU cost of each op in the implementations considered (PIL as the published
recipe calls it, OpenCV, libjpeg-turbo through simplejpeg/OpenCV/torchvision), at 224 px.

With --device cuda (or auto on a GPU machine), the device side of (c) and (d): prepare() on
batches of --batch images (GPU time from CUDA events, and the training process's CPU time), and
end to end, images/s of an image-folder loader with --workers processes plus prepare(), beside
the training step's images/s when --step-json names a bench_step.py result.

Inputs: JPEGs (q=90, 500x375) made from scikit-image's bundled photos; where scikit-image is
missing (the GPU image), --images DIR reads the JPEGs `--write-images DIR` wrote elsewhere.

    python benchmarks/bench_data.py --out benchmarks/results/data_cpu.json
    python benchmarks/bench_data.py --write-images .bench_jpegs     # then carry it to a GPU machine
    python benchmarks/bench_data.py --images .bench_jpegs --device cuda --out $OUT/data_gpu.json
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
from massl.config import Config, DataConfig  # noqa: E402
from massl.data import build_data  # noqa: E402
from massl.data.batch import collate
from massl.data.prepare import DevicePrepare  # noqa: E402
from massl.data.augment.device import normalize  # noqa: E402
from massl.data.augment.draw import sample_rng  # noqa: E402
from massl.data.multicrop import MultiCropAugmentation  # noqa: E402

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


def has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


class PILGaussianBlur:
    """method.md's blur: PIL GaussianBlur with a radius uniform in [0.1, 2.0] (as the published code)."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def published_recipe():
    bicubic = T.InterpolationMode.BICUBIC
    flip_jitter_gray = [T.RandomHorizontalFlip(0.5),
                        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    to_float = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    glob = [T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic)] + flip_jitter_gray
    g1 = T.Compose(glob + [T.RandomApply([PILGaussianBlur()], p=1.0)] + to_float)
    g2 = T.Compose(glob + [T.RandomApply([PILGaussianBlur()], p=0.1), T.RandomSolarize(128, p=0.2)] + to_float)
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.32), interpolation=bicubic)] + flip_jitter_gray
                      + [T.RandomApply([PILGaussianBlur()], p=0.5)] + to_float)

    def run(data: bytes, i: int):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [g1(img), g2(img)] + [local(img) for _ in range(10)]

    return run


def worker_pipeline(d: DataConfig, on_device: bool, normalise: bool = False):
    """What a DataLoader worker does per image (MultiCropAugmentation.load)."""
    aug = MultiCropAugmentation(d, photometric_on_device=on_device)
    mean, std = d.aug.mean, d.aug.std

    def run(data: bytes, i: int):
        views = aug.load(data, sample_rng(0, 0, i))
        if normalise:
            return [normalize(c.unsqueeze(0), mean, std) for c in views.crops]
        return views

    return run


def time_cpu(fn, blobs, n: int) -> float:
    start = time.process_time()
    for i in range(n):
        fn(blobs[i % len(blobs)], i)
    return (time.process_time() - start) / n


def cpu_rows(blobs: list[bytes], images: int, reps: int) -> dict:
    pipelines = {"a_published_torchvision": published_recipe()}
    if has_module("cv2"):
        pipelines["b_massl_cpu_worker"] = worker_pipeline(DataConfig(), False)
        pipelines["b+_massl_cpu_with_normalise"] = worker_pipeline(DataConfig(), False, normalise=True)
    else:
        print("OpenCV is not installed: no (b) rows", file=sys.stderr)
    pipelines["c_massl_gpu_augment_worker"] = worker_pipeline(DataConfig(), True)
    pipelines["d_massl_device_decode_worker"] = worker_pipeline(DataConfig(decode="device"), True)
    for fn in pipelines.values():  # warm-up
        time_cpu(fn, blobs, len(blobs))
    times = {k: [] for k in pipelines}
    for _ in range(reps):
        for k, fn in pipelines.items():
            times[k].append(time_cpu(fn, blobs, images))
    base = statistics.median(times["a_published_torchvision"])
    rows = {}
    for k, ts in times.items():
        t = statistics.median(ts)
        rows[k] = {"ms_per_image": 1e3 * t, "images_per_s_per_core": 1 / t, "speedup_vs_a": base / t,
                   "ms_per_image_reps": [round(1e3 * x, 3) for x in ts]}
    return rows


def candidates(blob: bytes) -> dict:
    """ms of CPU per call, per op and implementation (224 px crops, a 500x375 JPEG)."""
    import numpy as np
    import torchvision.transforms.functional as TF

    def ms(fn, n: int = 60) -> float:
        fn()
        start = time.process_time()
        for _ in range(n):
            fn()
        return round(1e3 * (time.process_time() - start) / n, 4)

    out = {"decode": {"PIL (fallback)": ms(lambda: Image.open(io.BytesIO(blob)).convert("RGB"))}}
    import warnings

    from torchvision.io import decode_jpeg
    encoded = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out["decode"]["torchvision.io"] = ms(lambda: decode_jpeg(encoded))
    if has_module("simplejpeg"):
        import simplejpeg

        out["decode"]["simplejpeg (chosen)"] = ms(lambda: simplejpeg.decode_jpeg(blob, colorspace="RGB"))
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    crop = img.crop((40, 30, 440, 330)).resize((224, 224), Image.BICUBIC)
    out["crop_resize_400x300_to_224"] = {"PIL": ms(lambda: img.crop((40, 30, 440, 330)).resize((224, 224), Image.BICUBIC))}
    from massl.data.multicrop import resized_crop, to_uint8_tensor
    pixels = to_uint8_tensor(img)
    out["crop_resize_400x300_to_224"]["torch uint8 antialias (chosen)"] = ms(
        lambda: resized_crop(pixels, (40, 30, 440, 330), 224, "bicubic"))
    pil_ops = {"brightness": lambda: TF.adjust_brightness(crop, 1.3), "contrast": lambda: TF.adjust_contrast(crop, 1.3),
               "saturation": lambda: TF.adjust_saturation(crop, 1.1), "hue": lambda: TF.adjust_hue(crop, 0.05),
               "grayscale": lambda: crop.convert("L").convert("RGB"),
               "blur_sigma_1": lambda: crop.filter(ImageFilter.GaussianBlur(1.0))}
    for op, fn in pil_ops.items():
        out[op] = {"PIL": ms(fn)}
    if has_module("cv2"):
        import cv2

        from massl.data.augment import cpu as C
        x = np.asarray(crop)
        out["decode"]["OpenCV"] = ms(lambda: cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR))
        cv_ops = {"brightness": lambda: C.adjust_brightness(x, 1.3), "contrast": lambda: C.adjust_contrast(x, 1.3),
                  "saturation": lambda: C.adjust_saturation(x, 1.1), "hue": lambda: C.adjust_hue(x, 0.05),
                  "grayscale": lambda: cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB),
                  "blur_sigma_1": lambda: C.gaussian_blur(x, 1.0)}
        for op, fn in cv_ops.items():
            out[op]["OpenCV (chosen)"] = ms(fn)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_cost(blobs: list[bytes], d: DataConfig, device: torch.device, batch: int, reps: int) -> dict:
    """prepare() per image on `device`: device time (CUDA events) and the calling process's CPU time."""
    aug = MultiCropAugmentation(d, photometric_on_device=True)
    prepare = DevicePrepare(d, True, aug)
    batches = [collate([(aug.load(blobs[(r * batch + i) % len(blobs)], sample_rng(0, r, i)), 0, i, ())
                        for i in range(batch)]) for r in range(2)]
    if device.type == "cuda":  # as the DataLoader hands them over
        batches = [b.pin_memory() for b in batches]
    for b in batches:  # warm-up (lazy imports, nvJPEG handles, allocator)
        prepare(b, device)
    synchronize(device)
    cpu, dev = [], []
    for r in range(reps):
        b = batches[r % len(batches)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.process_time()
        prepare(b, device)
        cpu.append(time.process_time() - t0)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            dev.append(start.elapsed_time(end) / 1e3)
    row = {"device_host_cpu_ms_per_image": 1e3 * statistics.median(cpu) / batch}
    if dev:
        row["device_ms_per_image"] = 1e3 * statistics.median(dev) / batch
    return row


def end_to_end(blobs: list[bytes], d: DataConfig, device: torch.device, workers: int, batches: int) -> float:
    """images/s of an image-folder loader (`workers` processes) plus prepare() on the device, in
    steady state: timing starts once each worker has delivered a batch (the prefetched ones)."""
    with tempfile.TemporaryDirectory() as folder:
        rng = random.Random(0)
        for k in range(16 * d.batch_size):  # varied sizes and crops of the photos; epochs repeat them
            img = Image.open(io.BytesIO(blobs[k % len(blobs)])).convert("RGB")
            w, h = rng.randint(300, img.width), rng.randint(260, img.height)
            left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
            img.crop((left, top, left + w, top + h)).save(os.path.join(folder, f"{k:05d}.jpg"), quality=90)
        cfg = Config()
        cfg.data = d
        d.path, d.num_workers = folder, workers
        source = build_data(cfg, 0, 1, device.type)
        warm, done, epoch, start = workers + 1, 0, 0, 0.0
        try:
            while done < warm + batches:
                for batch in source.epoch(epoch):
                    source.prepare(batch, device)
                    done += 1
                    if done == warm:
                        synchronize(device)
                        start = time.perf_counter()
                    if done == warm + batches:
                        break
                epoch += 1
            synchronize(device)
            return batches * d.batch_size / (time.perf_counter() - start)
        finally:
            source.close()


def step_images_per_s(path: str) -> float:
    """The fastest ViT-B/16 (else any) step of a bench_step.py result."""
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if "img_per_s" in r]
    base = [r for r in rows if r["arch"] == "vit_base"] or rows
    return max(r["img_per_s"] for r in base)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="", help="a folder of JPEGs to use instead of scikit-image's photos")
    p.add_argument("--write-images", default="", help="write the benchmark JPEGs to this folder and exit")
    p.add_argument("--per-rep", type=int, default=140, help="images per repetition and CPU pipeline")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--device", default="auto", choices=["auto", "none", "cpu", "cuda"],
                   help="where to measure prepare() (auto: cuda when available, else none)")
    p.add_argument("--batch", type=int, default=64, help="images per batch for the device side")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="loader processes for the end-to-end rate")
    p.add_argument("--e2e-batches", type=int, default=100, help="timed batches end to end")
    p.add_argument("--step-json", default="", help="a bench_step.py result to compare the end-to-end rate with")
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    p.add_argument("--machine", default="", help="description of the machine for the record")
    args = p.parse_args(argv)
    if args.write_images:
        os.makedirs(args.write_images, exist_ok=True)
        print("\n".join(make_jpegs(args.write_images)))
        return {}
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    if args.images:
        paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.endswith(".jpg"))
        blobs = [open(path, "rb").read() for path in paths]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_jpegs(tmp)
            blobs = [open(path, "rb").read() for path in paths]
    names = ", ".join(os.path.basename(path)[:-4] for path in paths)
    rows = cpu_rows(blobs, args.per_rep, args.reps)
    load = os.getloadavg()
    device = None if args.device == "none" or (args.device == "auto" and not torch.cuda.is_available()) \
        else torch.device("cuda" if args.device == "auto" else args.device)
    result = {"machine": args.machine or platform.processor() or platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__,
              "pillow": Image.__version__, "threads": 1, "load_avg_1_5_15": [round(x, 2) for x in load],
              "images": f"{len(blobs)} JPEGs q=90 {SIZE[0]}x{SIZE[1]} from skimage.data ({names})",
              "crops": "2 x 224 px (scale 0.32-1) + 10 x 96 px (scale 0.05-0.32)", "results": rows,
              "candidates": candidates(blobs[1 % len(blobs)])}
    if has_module("cv2"):
        import cv2

        result["opencv"] = cv2.__version__
    if device is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result["device_batch"], result["loader_workers"] = args.batch, args.workers
        step = step_images_per_s(args.step_json) if args.step_json else None
        modes = {"c_massl_gpu_augment_worker": DataConfig(gpu_augment="true"),
                 "d_massl_device_decode_worker": DataConfig(decode="device")}
        if "b_massl_cpu_worker" in rows:
            modes["b_massl_cpu_worker"] = DataConfig(gpu_augment="false")
        for name, d in modes.items():
            d.batch_size = args.batch
            if name != "b_massl_cpu_worker":
                rows[name].update(device_cost(blobs, d, device, args.batch, max(3, args.reps)))
            rate = end_to_end(blobs, d, device, args.workers, args.e2e_batches)
            rows[name]["end_to_end_images_per_s"] = rate
            if step:
                rows[name]["end_to_end_vs_step"] = rate / step
        result["step_images_per_s"] = step
    print(f"{'pipeline':30s} {'ms/img':>8s} {'img/s/core':>11s} {'vs (a)':>7s}")
    for k, r in rows.items():
        extra = "".join(f"  {c} {r[c]:.3f}" for c in ("device_ms_per_image", "device_host_cpu_ms_per_image",
                                                       "end_to_end_images_per_s", "end_to_end_vs_step") if c in r)
        print(f"{k:30s} {r['ms_per_image']:8.2f} {r['images_per_s_per_core']:11.1f} {r['speedup_vs_a']:6.2f}x{extra}")
    print("candidates, ms per call:")
    for op, impls in result["candidates"].items():
        print(f"  {op:28s} " + "  ".join(f"{k}: {v:.3f}" for k, v in impls.items()))
    print(f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

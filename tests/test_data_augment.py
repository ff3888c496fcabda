"""Multi-crop augmentation: parameter distributions of method.md, CPU ops and device ops
(data.gpu_augment) vs torchvision's PIL functions per op, CPU vs device path."""
from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from massl.config import DataConfig
from massl.data import multicrop as M
from massl.data.augment import cpu as C
from massl.data.augment import device as G
from massl.data.augment import draw as D


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    import skimage.data

    out = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).resize((500, 375)).save(out, "JPEG", quality=90)
    return out.getvalue()


def within(count: int, n: int, p: float) -> bool:
    """count is a plausible Binomial(n, p) draw (5 sigma)."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_parameter_distributions_follow_method_md():
    d = DataConfig()
    aug = M.MultiCropAugmentation(d)
    n = 2000
    draws = [aug.draw(random.Random(i), 500, 375) for i in range(n)]
    a = d.aug
    for v, blur_p, sol_p in ((0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0), (11, 0.5, 0.0)):
        crops = [ds[v] for ds in draws]
        assert within(sum(c.flip for c in crops), n, 0.5)
        assert within(sum(c.jitter is not None for c in crops), n, 0.8)
        assert within(sum(c.gray for c in crops), n, 0.2)
        assert within(sum(c.blur_sigma > 0 for c in crops), n, blur_p)
        assert within(sum(c.solarize for c in crops), n, sol_p)
        assert all(0.1 <= c.blur_sigma <= 2.0 for c in crops if c.blur_sigma)
        scale = d.global_crops_scale if v < 2 else d.local_crops_scale
        areas = [c.box[2] * c.box[3] / (500 * 375) for c in crops]
        assert min(areas) >= scale[0] * 0.95 and max(areas) <= scale[1] * 1.05
    jit = [c.jitter for ds in draws for c in ds if c.jitter is not None]
    assert all(1 - a.brightness <= j[1] <= 1 + a.brightness and 1 - a.contrast <= j[2] <= 1 + a.contrast
               and 1 - a.saturation <= j[3] <= 1 + a.saturation and -a.hue <= j[4] <= a.hue for j in jit)
    first_ops = [j[0][0] for j in jit]
    assert all(within(first_ops.count(op), len(jit), 0.25) for op in range(4))  # random op order
    forced = DataConfig()
    for k in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob_local"):
        setattr(forced.aug, k, 1.0)
    forced.aug.blur_prob_global1 = 0.0
    crops = M.MultiCropAugmentation(forced).draw(random.Random(0), 500, 375)
    assert all(c.flip and c.jitter and c.gray for c in crops) and crops[0].blur_sigma == 0 and crops[5].blur_sigma > 0


# Max abs difference from PIL's GaussianBlur, in 0-255 levels, of the blur on both paths: PIL
# rounds after each of its six box passes, massl once at the end (measured: 3 at sigma <= 0.3,
# 1-2 above).
BLUR_LEVELS = 3


def levels(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def test_cpu_ops_match_torchvision_pil_functions(photo_jpeg):
    """augment/cpu.py (OpenCV) against torchvision's PIL functions, the published recipe's ops,
    and against the exact float rotation where the PIL op itself quantises (hue)."""
    img = Image.open(io.BytesIO(photo_jpeg)).convert("RGB").resize((96, 72))
    x = np.asarray(img)
    exact = torch.from_numpy(x.copy()).permute(2, 0, 1).double() / 255
    for f in (0.6, 1.0, 1.37):
        assert np.array_equal(C.adjust_brightness(x, f), np.asarray(TF.adjust_brightness(img, f)))
        assert np.array_equal(C.adjust_contrast(x, f), np.asarray(TF.adjust_contrast(img, f)))
        d = levels(C.adjust_saturation(x, f), TF.adjust_saturation(img, f))
        assert d.max() <= 1 and d.mean() < 0.01  # OpenCV's L conversion is off PIL's by a level in rare pixels
    for h in (-0.1, -0.03, 0.06):
        ref = (TF.adjust_hue(exact, h) * 255).permute(1, 2, 0).numpy()
        ours, pil = levels(C.adjust_hue(x, h), ref), levels(TF.adjust_hue(img, h), ref)
        # 8-bit HSV both: OpenCV's 256 hue steps per turn stay closer to the exact rotation than PIL's 255
        assert ours.mean() <= pil.mean() and ours.max() <= pil.max()
        assert levels(C.adjust_hue(x, h), TF.adjust_hue(img, h)).mean() < 1
    jitter = ((2, 0, 3, 1), 1.3, 0.7, 1.15, -0.08)  # saturation, brightness, hue, contrast
    ref = img
    for op in jitter[0]:
        ref = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op](ref, jitter[1 + op])
    got = D.CropParams(box=(0, 0, 96, 72), jitter=jitter)
    assert levels(C.photometric(x, got), ref).mean() < 1
    for sigma in (0.1, 0.3, 0.7, 1.3, 2.0):  # PIL's box passes, rounded once where PIL rounds after each
        assert levels(C.gaussian_blur(x, sigma), img.filter(ImageFilter.GaussianBlur(sigma))).max() <= BLUR_LEVELS
    p = D.CropParams(box=(0, 0, 96, 72), flip=True, gray=True, blur_sigma=1.3, solarize=True)
    ref = ImageOps.solarize(ImageOps.grayscale(ImageOps.mirror(img)).filter(ImageFilter.GaussianBlur(1.3)), 128)
    assert levels(C.photometric(x, p), np.asarray(ref.convert("RGB"))).max() <= BLUR_LEVELS
    src = M.to_uint8_tensor(Image.open(io.BytesIO(photo_jpeg)).convert("RGB"))
    full = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    for box, size in (((10, 20, 410, 300), 224), ((100, 50, 180, 130), 96), ((0, 0, 60, 50), 96)):
        ours = M.resized_crop(src, box, size, "bicubic").permute(1, 2, 0).numpy().astype(int)
        pil = np.asarray(full.resize((size, size), Image.BICUBIC, box=box), dtype=int)
        assert np.abs(ours - pil).mean() < 0.1 and np.percentile(np.abs(ours - pil), 99.9) <= 2


def test_device_ops_match_pil_per_op(photo_jpeg):
    """Each device op at fixed parameters against the PIL op of the published recipe (torchvision's
    PIL functions), max abs difference in 0-255 levels: brightness, contrast, saturation,
    grayscale, solarise 0 (PIL's rounding reproduced); blur BLUR_LEVELS; hue: the exact rotation
    rounded to levels (within half a level of torchvision's float tensor op, and 6 levels of PIL's
    8-bit HSV, which quantises the hue)."""
    img = Image.open(io.BytesIO(photo_jpeg)).convert("RGB").resize((96, 72))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None]  # levels, as prepare() sees them

    def dev(y: torch.Tensor) -> np.ndarray:
        return y[0].permute(1, 2, 0).numpy()

    for f in (0.6, 1.0, 1.37):
        t = torch.tensor([f])
        assert levels(dev(G.adjust_brightness(x, t)), TF.adjust_brightness(img, f)).max() == 0
        assert levels(dev(G.adjust_contrast(x, t)), TF.adjust_contrast(img, f)).max() == 0
        assert levels(dev(G.adjust_saturation(x, t)), TF.adjust_saturation(img, f)).max() == 0
    for h in (-0.1, -0.03, 0.06):
        ours = dev(G.adjust_hue(x, torch.tensor([h])))
        exact = (TF.adjust_hue(x[0].double() / 255, h) * 255).permute(1, 2, 0).numpy()
        assert levels(ours, exact).max() <= 0.5 + 1e-3 and levels(ours, TF.adjust_hue(img, h)).max() <= 6
    assert levels(dev(G.grayscale(x).expand_as(x)), img.convert("L").convert("RGB")).max() == 0
    assert levels(dev(G.solarize(x)), ImageOps.solarize(img, 128)).max() == 0
    for sigma in (0.1, 0.3, 0.7, 1.3, 2.0):
        pil = img.filter(ImageFilter.GaussianBlur(sigma))
        assert levels(dev(G.gaussian_blur(x, D.blur_boxes([sigma]))), pil).max() <= BLUR_LEVELS, sigma
    u8 = x.to(torch.uint8)
    assert torch.allclose(G.normalize(u8, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                          TF.normalize(u8.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), atol=1e-5)


def test_blur_variance_is_sigma_squared_at_every_sigma():
    """The blur's impulse response has variance sigma^2 (PIL's GaussianBlur(radius=sigma)), down
    to the recipe's smallest sigma: a Gaussian sampled at integer taps collapses below ~0.5
    (std 0.003 at sigma 0.2)."""
    t = np.arange(-20, 21)
    for sigma in (0.1, 0.2, 0.3, 0.4, 0.7, 1.0, 1.6, 2.0):
        box = D.blur_box(sigma)
        kernel = np.convolve(np.convolve(box, box), box)  # PIL's three passes per axis
        taps = np.arange(len(kernel)) - len(kernel) // 2
        assert abs(kernel.sum() - 1) < 1e-12 and abs((kernel * taps * taps).sum() - sigma ** 2) < 1e-9, sigma
        u8 = np.full((41, 41), 0, np.uint8)
        u8[:, 20] = 255  # a vertical line: each op's rounded response along x
        cpu = C.gaussian_blur(u8, sigma)[20].astype(np.float64)
        dev = G.gaussian_blur(torch.from_numpy(u8).float()[None, None], D.blur_boxes([sigma]))[0, 0, 20].double().numpy()
        for row in (cpu, dev):
            assert abs((row * t * t).sum() / row.sum() - sigma ** 2) < 0.02 + 0.05 * sigma ** 2, sigma  # tails rounded away


def test_gpu_augment_batch_equals_a_per_sample_reference():
    """Each sample gets its own parameters and jitter order, whatever the others in the batch do."""
    g = torch.Generator().manual_seed(1)
    n = 16
    u8 = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    rows = []
    for i in range(n):
        rng = random.Random(i)
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        p = D.CropParams(box=(0, 0, 1, 1), flip=rng.random() < 0.5, gray=rng.random() < 0.3,
                         jitter=(tuple(order), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2),
                                 rng.uniform(-0.1, 0.1)) if rng.random() < 0.8 else None,
                         blur_sigma=rng.uniform(0.1, 2.0) if rng.random() < 0.5 else 0.0, solarize=rng.random() < 0.3)
        rows.append(p)
    params = torch.tensor([p.as_row() for p in rows])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = G.GpuAugment(mean, std)(u8, params)
    pil_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, exact_hue)
    for i, p in enumerate(rows):
        x = TF.to_pil_image(u8[i])
        if p.flip:
            x = ImageOps.mirror(x)
        if p.jitter:
            for op in p.jitter[0]:
                x = pil_ops[op](x, p.jitter[1 + op])
        if p.gray:
            x = x.convert("L").convert("RGB")
        if p.blur_sigma:
            x = x.filter(ImageFilter.GaussianBlur(p.blur_sigma))
        if p.solarize:
            x = ImageOps.solarize(x, 128)
        ref = TF.normalize(TF.to_tensor(x), mean, std)
        # in levels (x 255 x std): the blur's rounding, and a level where float ties round apart
        assert ((out[i] - ref) * torch.tensor(std).view(3, 1, 1) * 255).abs().max() <= BLUR_LEVELS + 1e-3, i


def exact_hue(img: Image.Image, h: float) -> Image.Image:
    """torchvision's float hue rotation, rounded to levels (the device op's definition; PIL's own
    8-bit HSV hue is 255 steps per turn)."""
    y = TF.adjust_hue(TF.pil_to_tensor(img).double() / 255, h)
    return TF.to_pil_image((y * 255).round().to(torch.uint8))


def test_cpu_and_device_paths_agree_on_a_photo(photo_jpeg):
    d = DataConfig()
    cpu, dev = M.MultiCropAugmentation(d, False), M.MultiCropAugmentation(d, True)
    augment = G.GpuAugment([0, 0, 0], [1, 1, 1])  # compare in [0, 1] units
    for i in range(3):
        on_cpu, none = cpu(Image.open(io.BytesIO(photo_jpeg)), D.sample_rng(0, 0, i))
        crops, params = dev(Image.open(io.BytesIO(photo_jpeg)), D.sample_rng(0, 0, i))
        assert none is None and params.shape == (12, D.NUM_PARAMS)
        for v in range(12):
            diff = (on_cpu[v].float() / 255 - augment(crops[v].unsqueeze(0), params[v:v + 1])[0]).abs()
            assert diff.mean() < 0.02, (i, v, diff.mean())  # rounding, PIL's box-blur vs a true Gaussian


def test_draft_decode_serves_large_jpegs(photo_jpeg):
    big = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).resize((2000, 1500)).save(big, "JPEG", quality=90)
    d = DataConfig(global_crop_size=64, local_crop_size=32)
    aug = M.MultiCropAugmentation(d, photometric_on_device=True)
    full = M.to_uint8_tensor(Image.open(io.BytesIO(big.getvalue())).convert("RGB"))
    for i in range(3):
        rng_params, rng_crops = D.sample_rng(0, 0, i), D.sample_rng(0, 0, i)
        params = aug.draw(rng_params, 2000, 1500)
        factor = M.draft_factor(params, [64, 64] + [32] * 10, 2000, 1500)
        assert factor >= 2 and all(min(p.box[2], p.box[3]) >= factor * s for p, s in zip(params, [64, 64] + [32] * 10))
        img = Image.open(io.BytesIO(big.getvalue()))
        crops, _ = aug(img, rng_crops)
        assert img.size == (2000 // factor, 1500 // factor)  # decoded at the reduced scale
        sx, sy = img.size[0] / 2000, img.size[1] / 1500
        for p, c, s in zip(params, crops, [64, 64] + [32] * 10):
            left, top, w, h = p.box
            # the box rounded to whole pixels of the reduced image moves by under one output pixel
            moved = max([abs(round(v * sx) / sx - v) * s / w for v in (left, left + w)]
                        + [abs(round(v * sy) / sy - v) * s / h for v in (top, top + h)])
            assert moved <= 1.0, (p.box, factor, moved)
            ref = M.resized_crop(full, (left, top, left + w, top + h), s, "bicubic")
            # levels of 255: DCT scaling vs bicubic, and boxes rounded to whole pixels of the reduced image
            assert (c.float() - ref.float()).abs().mean() < 2.5
        # from the bytes (simplejpeg when installed, DCT-scaled alike): the same pixels as PIL's decode
        views = aug.load(big.getvalue(), D.sample_rng(0, 0, i))
        assert all(torch.equal(a, b) for a, b in zip(views.crops, crops))
    small = aug.draw(random.Random(0), 60, 40)
    assert M.draft_factor(small, [64, 64] + [32] * 10, 60, 40) == 1
    off = M.MultiCropAugmentation(DataConfig(global_crop_size=64, local_crop_size=32, draft_decode=False), True)
    img = Image.open(io.BytesIO(big.getvalue()))
    off(img, D.sample_rng(0, 0, 0))
    assert img.size == (2000, 1500)  # data.draft_decode: false decodes at full resolution


def test_training_with_gpu_augment_on_cpu(tiny_config):
    """data.gpu_augment=true end to end: folder workers send uint8 crops and parameter rows,
    prepare() augments on the (CPU) device, and the crops are those of the CPU path up to rounding."""
    from massl.data import build_data
    from massl.train import train

    cfg = tiny_config("data.gpu_augment=true", "run.max_steps=2", "data.num_workers=1")
    summary = train(cfg)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    on_device = build_data(cfg, 0, 1)
    batch = next(iter(on_device.epoch(0)))
    assert batch.params is not None and batch.crops[0].dtype == torch.uint8
    on_cpu = build_data(tiny_config("data.gpu_augment=false"), 0, 1)
    cpu_batch = next(iter(on_cpu.epoch(0)))
    for a, b in zip(on_device.prepare(batch, torch.device("cpu")), on_cpu.prepare(cpu_batch, torch.device("cpu"))):
        assert a.shape == b.shape and (a - b).abs().mean() < 0.1  # normalised units


def test_gpu_augment_auto_follows_the_device(tiny_config):
    """auto: photometric ops on the device only when it is CUDA; YAML booleans force it."""
    from massl.data import build_data

    assert tiny_config().data.gpu_augment == "auto"
    for value, device, expected in (("auto", "cpu", False), ("auto", "cuda", True), ("true", "cpu", True),
                                    ("false", "cuda", False)):
        source = build_data(tiny_config(f"data.gpu_augment={value}"), 0, 1, device)
        assert (source.prepare.augment is not None) == expected, (value, device)
        source.close()

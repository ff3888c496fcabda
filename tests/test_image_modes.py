"""Images of every PIL mode become the pixels a person sees, the same in training, evaluation and
massl-shard. References are numpy formulas written here, not massl's code."""
from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from massl.tools.shard_inputs import load_checked
from massl.config import Config, DataConfig
from massl.data.multicrop import MultiCropAugmentation
from massl.eval.extract import eval_transform, extract_features
from massl.eval.inputs import open_input
from massl.image import to_rgb

H, W = 6, 10
RNG = np.random.RandomState(0)
WHITE = 255.0


def reopened(img: Image.Image, fmt: str = "PNG") -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return Image.open(io.BytesIO(buf.getvalue()))


def grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + WHITE * (1 - a)


def case_16bit_png():
    v = RNG.randint(0, 65536, (H, W)).astype(np.uint16)
    v[0, :3] = (0, 65535, 40000)
    return reopened(Image.fromarray(v)), grey(np.floor(v / 257 + 0.5)), 0


def case_16bit_big_endian():
    v = RNG.randint(0, 65536, (H, W)).astype(">u2")
    return Image.frombytes("I;16B", (W, H), v.tobytes()), grey(np.floor(v.astype(np.float64) / 257 + 0.5)), 0


def case_int32():
    v = RNG.randint(-1000, 70000, (H, W)).astype(np.int32)
    return Image.fromarray(v), grey(np.floor(np.clip(v, 0, 65535) / 257 + 0.5)), 0


def case_float():
    v = RNG.uniform(-0.5, 1.5, (H, W)).astype(np.float32)
    return Image.fromarray(v), grey(np.clip(v.astype(np.float64), 0, 1) * 255), 1


def case_palette_with_transparency():
    idx = RNG.randint(0, 3, (H, W)).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 0, 0, 0, 0, 255] + [0] * 759)
    img.info["transparency"] = 1  # index 1 (black in the palette) is transparent
    colours = np.array([[255, 0, 0], [255, 255, 255], [0, 0, 255]], dtype=np.float64)
    return reopened(img), colours[idx], 0


def case_rgba():
    rgb = RNG.randint(0, 256, (H, W, 3)).astype(np.uint8)
    alpha = RNG.randint(0, 256, (H, W)).astype(np.uint8)
    return reopened(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), over_white(rgb.astype(np.float64), alpha), 1


def case_la():
    v = RNG.randint(0, 256, (H, W)).astype(np.uint8)
    alpha = RNG.randint(0, 256, (H, W)).astype(np.uint8)
    img = Image.merge("LA", [Image.fromarray(v), Image.fromarray(alpha)])
    return reopened(img), over_white(grey(v.astype(np.float64)), alpha), 1


def case_cmyk():
    cmyk = RNG.randint(0, 256, (H, W, 4)).astype(np.float64)
    ref = 255 * (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)
    return Image.fromarray(cmyk.astype(np.uint8), "CMYK"), ref, 1


def case_one_bit():
    bits = RNG.randint(0, 2, (H, W)).astype(bool)
    return reopened(Image.fromarray(bits)), grey(bits * 255.0), 0


CASES = [case_16bit_png, case_16bit_big_endian, case_int32, case_float, case_palette_with_transparency,
         case_rgba, case_la, case_cmyk, case_one_bit]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_every_mode_gives_the_visible_pixels(case):
    img, want, tolerance = case()
    got = to_rgb(img)
    assert got.mode == "RGB" and got.size == (W, H)
    assert np.abs(np.asarray(got, dtype=np.float64) - want).max() <= tolerance + 0.5


@pytest.fixture
def sixteen_bit(tmp_path):
    """A 16-bit grey PNG (dark to bright) and an 8-bit RGB PNG of the pixels it shows."""
    v = np.tile(np.linspace(0, 65535, 32), (24, 1)).astype(np.uint16)
    os.makedirs(tmp_path / "a" / "c")
    os.makedirs(tmp_path / "b" / "c")
    Image.fromarray(v).save(tmp_path / "a" / "c" / "x.png")
    Image.fromarray(grey(np.floor(v / 257 + 0.5)).astype(np.uint8)).save(tmp_path / "b" / "c" / "x.png")
    return str(tmp_path / "a" / "c" / "x.png"), str(tmp_path / "b" / "c" / "x.png")


def test_training_evaluation_and_sharding_see_the_16bit_image(sixteen_bit):
    deep, shown = sixteen_bit
    d = DataConfig(global_crop_size=16, local_crop_size=8, local_crops_number=2)
    aug = MultiCropAugmentation(d)
    with open(deep, "rb") as a, open(shown, "rb") as b:
        crops_a = aug.load(a.read(), random.Random(3)).crops
        crops_b = aug.load(b.read(), random.Random(3)).crops
    assert all((x == y).all() for x, y in zip(crops_a, crops_b))  # training
    assert float(crops_a[0].float().std()) > 10  # a gradient, not a white square

    a = Config().data.aug
    tf = eval_transform(a.mean, a.std, 16, crop_ratio=1.0)
    pixels = [extract_features(torch.nn.Flatten(), open_input(os.path.dirname(os.path.dirname(p))), tf, 16,
                               workers=0, progress=False).feats for p in (deep, shown)]
    assert torch.equal(*pixels)  # evaluation (features = the normalised input pixels)

    encoded = load_checked(deep, max_side=16)  # massl-shard re-encodes it
    got = np.asarray(Image.open(io.BytesIO(encoded["data"])).convert("L"), dtype=np.float64)
    ref = np.asarray(Image.open(shown).convert("L").resize(got.shape[::-1], Image.LANCZOS), dtype=np.float64)
    assert np.abs(got - ref).mean() < 4  # JPEG quality 90 of the same picture (white: ~130 away)

"""EXIF orientation (a camera's 'this side up') is applied the same way in every decode path:
training's CPU decode, the device path (which hands such JPEGs to the CPU), evaluation,
massl-shard's re-encoding and its recorded sizes; each against PIL's ImageOps.exif_transpose."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from massl.config import load_config


def jpeg(orientation: int, size=(48, 32)) -> bytes:
    """A JPEG of a picture with an unmistakable top-left corner, tagged with `orientation`."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[: size[1] // 3, : size[0] // 4] = (255, 0, 0)
    arr[:, -4:] = (0, 0, 255)
    arr[-3:, :] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def shown(data: bytes) -> np.ndarray:
    """The reference: PIL's exif_transpose of PIL's decode."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img.convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_training_turns_the_pixels_as_pil(orientation):
    from massl.data.multicrop import orient

    data = jpeg(orientation)
    with Image.open(io.BytesIO(data)) as img:
        stored = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(orient(stored, orientation).permute(1, 2, 0), torch.from_numpy(shown(data).copy()))


def crop_config(decode: str = "cpu"):
    """Crops of the whole image (scale 1, aspect kept), nothing else: a crop is the resized image."""
    return load_config(None, ["data.global_crop_size=32", "data.global_crops_scale=[1.0, 1.0]", "data.local_crops_number=0",
                              "data.aug.flip_prob=0", f"data.decode={decode}", "data.gpu_augment=true",
                              "model.patch_size=16"], check_paths=False).data


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_training_crop_of_a_rotated_jpeg_equals_that_of_the_upright_image(orientation):
    from massl.data.multicrop import MultiCropAugmentation

    aug = MultiCropAugmentation(crop_config(), photometric_on_device=True)  # crops only, no colour ops
    square = jpeg(orientation, size=(32, 32))
    upright_png = io.BytesIO()
    Image.fromarray(shown(square)).save(upright_png, "PNG")
    got = aug.load(square, random.Random(0)).crops[0]
    ref = aug.load(upright_png.getvalue(), random.Random(0)).crops[0]
    assert (got.int() - ref.int()).abs().max() <= 1  # simplejpeg vs PIL: the same libjpeg-turbo decode


def test_device_decoding_hands_rotated_jpegs_to_the_cpu():
    from massl.data.multicrop import MultiCropAugmentation

    aug = MultiCropAugmentation(crop_config("device"), photometric_on_device=True)
    assert aug.load(jpeg(1, (32, 32)), random.Random(0)).encoded is not None  # upright: the device decodes it
    views = aug.load(jpeg(6, (32, 32)), random.Random(0))
    assert views.encoded is None and views.fallback and views.crops is not None


def test_evaluation_and_massl_shard_see_the_image_upright(tmp_path):
    from massl.tools.shard_inputs import load_checked
    from massl.eval.inputs import open_rgb

    data = jpeg(6)  # stored 48 x 32, shown 32 x 48
    assert np.array_equal(np.asarray(open_rgb(io.BytesIO(data))), shown(data))
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    kept = load_checked(str(path))
    assert kept["data"] == data and (kept["width"], kept["height"]) == (32, 48)
    small = load_checked(str(path), max_side=24)  # re-encoded without EXIF: the pixels are turned
    with Image.open(io.BytesIO(small["data"])) as img:
        assert img.size == (16, 24) and (small["width"], small["height"]) == (32, 48)
        ref = Image.fromarray(shown(data)).resize((16, 24), Image.LANCZOS)
        assert np.abs(np.asarray(img.convert("RGB"), np.int16) - np.asarray(ref, np.int16)).mean() < 8

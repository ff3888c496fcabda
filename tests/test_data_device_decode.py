"""data.decode=device on the CPU device: the workers' draws, the batched decode + crop + resize
against the CPU path and PIL's resize, fallbacks and corrupt JPEGs in shards."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from massl.tools.shard import ShardWriter, main as shard_main
from massl.config import DataConfig, load_config
from massl.data import build_data
from massl.data import multicrop as M
from massl.data.augment.draw import sample_rng
from massl.data.batch import collate
from massl.data.prepare import DevicePrepare
from massl.data.device_decode import DeviceDecoder, resample_weights

CPU = torch.device("cpu")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """A landscape and a portrait photo, a progressive and a grayscale JPEG, and a PNG (no device decode)."""
    import skimage.data

    coffee, astronaut = Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.astronaut())
    return [encode(coffee.resize((500, 375)), quality=90), encode(astronaut.resize((300, 400)), quality=90),
            encode(coffee.resize((160, 120)), quality=85, progressive=True),
            encode(astronaut.resize((150, 150)).convert("L"), quality=90), encode(coffee.resize((120, 90)), "PNG")]


def samples(aug: M.MultiCropAugmentation, blobs: list[bytes]) -> list:
    return [(aug.load(b, sample_rng(0, 0, i)), 0, i, ()) for i, b in enumerate(blobs)]


def test_resample_weights_are_torchs_antialiased_resize():
    """One weight matrix applied to a float signal = torch's float antialiased interpolate of the box."""
    g = torch.Generator().manual_seed(0)
    signal = torch.rand(1, 1, 1, 70, generator=g, dtype=torch.float64)
    for mode in ("bicubic", "bilinear"):
        for start, length, size in ((5, 50, 16), (0, 70, 24), (30, 12, 20), (0, 9, 9)):
            w = resample_weights(torch.tensor([start], dtype=torch.float64), torch.tensor([length], dtype=torch.float64),
                                 size, 70, mode)[0]
            ref = torch.nn.functional.interpolate(signal[..., start:start + length], size=(1, size), mode=mode,
                                                  antialias=True, align_corners=False)[0, 0, 0]
            assert torch.allclose(w @ signal[0, 0, 0], ref, atol=1e-12), (mode, start, length, size)


def test_device_decode_cuts_the_cpu_paths_crops(photos):
    """Same RNG draws -> the same boxes, sizes and parameter rows as the CPU path; pixels within
    the resize's rounding: on the CPU device torchvision decodes with the same libjpeg-turbo
    (integer IDCT, fancy upsampling) as PIL, so only float vs PIL's fixed-point weights differ."""
    d = DataConfig(decode="device")
    on_device, cpu_path = M.MultiCropAugmentation(d), M.MultiCropAugmentation(DataConfig(), photometric_on_device=True)
    dev, cpu = samples(on_device, photos), samples(cpu_path, photos)
    for i, ((views, _, _, _), blob) in enumerate(zip(dev, photos)):
        width, height = Image.open(io.BytesIO(blob)).size
        boxes = [p.box for p in cpu_path.draw(sample_rng(0, 0, i), width, height)]
        if i < 4:
            assert views.encoded.boxes == boxes and views.crops is None and not views.fallback
        else:  # the PNG: cut in the worker by the CPU path
            assert views.encoded is None and views.fallback and len(views.crops) == 12
        assert torch.equal(views.params, cpu[i][0].params)
    batch, reference = collate(dev), collate(cpu)
    assert batch.fallback == 1 and batch.encoded.rows.tolist() == [0, 1, 2, 3]
    out = DeviceDecoder(on_device)(batch, CPU)
    for v, size in enumerate(on_device.sizes):
        assert out[v].shape == reference.crops[v].shape == (5, 3, size, size) and out[v].dtype == torch.uint8
        diff = (out[v].int() - reference.crops[v].int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.05, (v, diff.max(), diff.float().mean())
        assert torch.equal(out[v][4], reference.crops[v][4])  # the PNG's crops pass through
    full = Image.open(io.BytesIO(photos[0])).convert("RGB")  # and against the recipe's PIL crop + resize
    for v, p in enumerate(cpu_path.draw(sample_rng(0, 0, 0), *full.size)):
        left, top, w, h = p.box
        size = on_device.sizes[v]
        pil = np.asarray(full.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC), dtype=int)
        diff = np.abs(out[v][0].permute(1, 2, 0).numpy().astype(int) - pil)
        assert diff.mean() < 0.1 and np.percentile(diff, 99.9) <= 2


def test_device_prepare_matches_the_gpu_augment_path(photos):
    """prepare() with decode=device and with decode=cpu + gpu_augment give the same views."""
    d = DataConfig(decode="device")
    on_device, cpu_path = M.MultiCropAugmentation(d), M.MultiCropAugmentation(DataConfig(), photometric_on_device=True)
    a = DevicePrepare(d, True, on_device)(collate(samples(on_device, photos)), CPU)
    b = DevicePrepare(DataConfig(), True, cpu_path)(collate(samples(cpu_path, photos)), CPU)
    for x, y in zip(a, b):
        assert x.shape == y.shape and (x - y).abs().mean() < 1e-3 and (x - y).abs().max() < 0.1  # normalised units


@pytest.fixture
def jpeg_shards(photos, tmp_path):
    """One shard of 9 samples: 6 JPEGs, a PNG, a JPEG cut short (000006: no end marker, the
    worker sends it to the CPU path, where PIL refuses it) and one with a bogus Huffman table
    (000003: its size and end marker are intact, only a decoder notices; the worker's check decode
    refuses it as the CPU path does)."""
    good = [encode(Image.open(io.BytesIO(photos[k % 2])).resize((48 + 4 * k, 40)), quality=90) for k in range(6)]
    corrupt = bytearray(good[3])
    dht = corrupt.index(b"\xff\xc4")  # first Huffman table: its 16 code counts now sum past 256
    corrupt[dht + 5:dht + 21] = b"\xf0" * 16
    files = [("jpg", good[0]), ("jpg", good[1]), ("jpg", good[2]), ("jpg", bytes(corrupt)), ("jpg", good[3]),
             ("png", photos[4]), ("jpg", good[4][:-300]), ("jpg", good[4]), ("jpg", good[5])]
    out = str(tmp_path / "shards")
    os.makedirs(out)
    w = ShardWriter(out, "shard-000000.tar")
    for i, member in enumerate(files):
        w.add(f"{i:06d}", [member])
    w.finish()
    assert shard_main(["index", "--out", os.path.join(out, "manifest.json"), os.path.join(out, "shard-000000.tar")]) == 0
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_in_a_shard_is_skipped_and_counted(jpeg_shards, workers, caplog):
    def source(*extra):
        cfg = load_config(None, ["data.source=webdataset", f"data.urls={jpeg_shards}", "data.batch_size=3",
                                 f"data.num_workers={workers}", "data.shuffle_buffer=9", "data.global_crop_size=32",
                                 "data.local_crop_size=16", "data.local_crops_number=2", "model.arch=custom",
                                 "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8",
                                 *extra])
        return build_data(cfg, 0, 1, "cpu")

    dev, ref = source("data.decode=device"), source("data.gpu_augment=true")
    skipped = fallback = compared = 0
    for batch, cpu_batch in zip(dev.epoch(0), ref.epoch(0)):
        views, reference = dev.prepare(batch, CPU), ref.prepare(cpu_batch, CPU)
        skipped, fallback = skipped + batch.skipped, fallback + batch.fallback
        assert [v.shape[0] for v in views] == [3] * 4 and all(torch.isfinite(v).all() for v in views)
        for row, (key, cpu_key) in enumerate(zip(batch.keys, cpu_batch.keys)):
            assert key == cpu_key  # both damaged JPEGs are refused in the worker, replaced as on the CPU path
            assert all((x[row] - y[row]).abs().max() < 0.1 for x, y in zip(views, reference)), key
            compared += 1
    assert (skipped, fallback) == (2, 1) and compared == 9  # the two damaged JPEGs; the PNG
    if workers == 0:  # the warning comes from the process that decodes
        assert "skipping sample '000003'" in caplog.text


def test_training_with_device_decode_counts_fallbacks(tiny_config):
    """The digits are PNGs: every sample takes the CPU path, and the loop logs how many did."""
    from massl.train import train

    cfg = tiny_config("data.decode=device", "run.max_steps=2")
    summary = train(cfg)
    assert summary["step"] == 2 and summary["decode_fallback_images"] == 2 * cfg.data.batch_size


def test_a_jpeg_that_decodes_nowhere_is_replaced_within_its_batch(photos, caplog):
    """The device side's last resort, for a JPEG that passed the worker's check (made up here:
    a start and an end marker around zeros): decoded neither on the device nor on the CPU, its
    row takes another sample's crops and parameters and is counted."""
    on_device = M.MultiCropAugmentation(DataConfig(decode="device"))
    (good, *rest), (views, *other) = samples(on_device, photos[:2])
    bad = views._replace(encoded=M.Encoded(b"\xff\xd8" + bytes(100) + b"\xff\xd9", views.encoded.boxes))
    batch = collate([(good, *rest), (bad, *other)])
    out = DeviceDecoder(on_device)(batch, CPU)
    assert batch.skipped == 1 and all(torch.equal(o[1], o[0]) for o in out)
    assert all(torch.equal(p[1], p[0]) for p in batch.params)
    assert "decodes neither on the device nor on the CPU" in caplog.text

"""Damaged image files (tests/corrupt_images.py) under both decode paths: data.decode=device skips
and counts exactly the files the CPU path skips, and trains on the same good images."""
from __future__ import annotations


import pytest
import torch

from massl.config import load_config
from massl.data import build_data
from tests.conftest import tiny_overrides
from tests.corrupt_images import write_corpus

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corrupt"))
    good, damaged = write_corpus(root)
    return root, good, damaged


def source(root: str, *extra: str):
    cfg = load_config(None, tiny_overrides(root, "unused") + ["data.batch_size=4", *extra])
    return build_data(cfg, 0, 1, "cpu")


def test_device_decode_skips_what_the_cpu_path_skips(corpus):
    root, good, damaged = corpus
    dev, ref = source(root, "data.decode=device"), source(root, "data.gpu_augment=true", "data.draft_decode=false")  # the CPU path, full-size decode
    paths = dev.dataset.paths
    used, unreadable, skipped = set(), [], 0
    for n, (batch, cpu_batch) in enumerate(zip(dev.epoch(0), ref.epoch(0))):
        views = dev.prepare(batch, CPU)  # the device decodes here
        # before: the device decoded 5 damaged JPEGs (libjpeg-turbo only warns) and replaced another
        # one within its batch: other keys, 14 - 6 skipped
        assert (batch.keys, batch.skipped) == (cpu_batch.keys, cpu_batch.skipped)
        assert [p for p, _ in batch.unreadable] == [p for p, _ in cpu_batch.unreadable]
        assert batch.fallback == sum(not paths[k].endswith(".jpg") for k in batch.keys)  # the PNGs only
        for x, y in zip(views, ref.prepare(cpu_batch, CPU) if n == 0 else []):  # the same pixels, within the
            assert (x - y).abs().mean() < 0.01 and (x - y).abs().max() < 0.2  # resize's rounding
        used.update(paths[k] for k in batch.keys)
        unreadable += [p for p, _ in batch.unreadable]
        skipped += batch.skipped
    assert used == set(good) and sorted(unreadable) == sorted(damaged) and skipped == len(damaged)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_training_counts_every_damaged_file(corpus, tmp_path, decode, caplog):
    from massl.train import train

    root, _, damaged = corpus
    cfg = load_config(None, tiny_overrides(root, str(tmp_path / "run")) + [
        "data.batch_size=4", f"data.decode={decode}", "optim.epochs=1", "optim.warmup_epochs=0",
        "loss.warmup_teacher_temp_epochs=0"])
    summary = train(cfg)
    assert summary["skipped_images"] == len(damaged)  # the run's counter: each damaged file once
    assert f"skipped {len(damaged)}" in caplog.text  # and its log line
    named = {p for p in damaged if f"skipping unreadable image {p} " in caplog.text}
    assert named == set(damaged)

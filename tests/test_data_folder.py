"""Image-folder source: unreadable files are counted once per replaced sample and named once."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from massl.config import DataConfig
from massl.data.folder import ImageFolderSource

BAD = ["c0.jpg", "c1.jpg", "c2.jpg", "c3.png"]  # consecutive in path order: each replaces the next


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_counted_once_and_named_once(tmp_path, caplog, workers):
    rng = np.random.RandomState(0)
    for i in range(28):
        Image.fromarray(rng.randint(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{'a' if i < 14 else 'd'}{i:02d}.png")
    for name in BAD:
        (tmp_path / name).write_bytes(b"not an image")
    d = DataConfig(path=str(tmp_path), batch_size=8, num_workers=workers, global_crop_size=8, local_crop_size=8,
                   local_crops_number=0)
    source = ImageFolderSource(d, seed=0, rank=0, world=1)
    assert source.iters_per_epoch == 4  # 32 files, batch 8: every file is drawn once per epoch
    for epoch in range(2):
        batches = list(source.epoch(epoch))
        # 4 unreadable files -> 4 replaced samples (before the fix: 4 + 3 + 2 + 1 = 10)
        assert sum(b.skipped for b in batches) == len(BAD)
        assert sum(len(b.keys) for b in batches) == 32
    logged = caplog.text
    for name in BAD:
        assert logged.count(f"image {os.path.join(str(tmp_path), name)} (") == 1, logged  # named once over both epochs
    source.close()

"""Image-folder input: class sub-folders (labels) or a flat folder, read with random access."""
from __future__ import annotations

from typing import Iterator

import torch
from PIL import Image

from ..signals import ignore_stop_signals
from .batch import Batch, DevicePrepare, collate
from .files import scan_image_folder
from .multicrop import DECODE_ERRORS, MultiCropAugmentation, sample_rng

class MultiCropFolder(torch.utils.data.Dataset):
    """Indexed by (epoch, index). An unreadable image is replaced by the next readable one and counted."""

    MAX_REPLACEMENTS = 16

    def __init__(self, root: str, transform: MultiCropAugmentation, seed: int):
        self.paths, self.labels, self.classes = scan_image_folder(root)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = key
        for skipped in range(self.MAX_REPLACEMENTS):
            i = (index + skipped) % len(self.paths)
            try:
                with Image.open(self.paths[i]) as img:  # decoded by the transform (JPEG draft mode)
                    return self.transform(img, sample_rng(self.seed, epoch, i)), skipped, i
            except DECODE_ERRORS:
                continue
        raise RuntimeError(f"{self.MAX_REPLACEMENTS} consecutive unreadable images from {self.paths[index]!r}")


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) for this rank: a (seed, epoch) permutation, cut into global batches of
    world * batch, rank r taking the r-th block of each, so the global batch does not depend on the
    world size. The tail that does not fill a global batch is dropped; `start` resumes mid-epoch."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.epoch, self.start = 0, 0

    @property
    def iters_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        G = self.batch * self.world
        for it in range(self.start, self.iters_per_epoch):
            base = it * G + self.rank * self.batch
            for i in order[base:base + self.batch]:
                yield self.epoch, i

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start) * self.batch


class ImageFolderSource:
    """DataSource over an image folder: `epoch(e, start)` yields Batches; `prepare` moves them to the device."""

    def __init__(self, d, seed: int, rank: int, world: int, pin_memory: bool = False, gpu_augment: bool = False):
        self.dataset = MultiCropFolder(d.path, MultiCropAugmentation(d, photometric_on_device=gpu_augment), seed)
        self.prepare = DevicePrepare(d, gpu_augment)
        self.sampler = EpochSampler(len(self.dataset), d.batch_size, rank, world, seed)
        if self.sampler.iters_per_epoch == 0:
            raise ValueError(f"data.path {d.path!r} has {len(self.dataset)} images, fewer than one global batch "
                             f"({world} ranks x data.batch_size {d.batch_size}); lower data.batch_size")
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.num_workers,
            collate_fn=collate, pin_memory=pin_memory, drop_last=True,
            persistent_workers=d.num_workers > 0, prefetch_factor=4 if d.num_workers > 0 else None,
            generator=torch.Generator(),  # its own, so starting an epoch never draws from the global RNG
            worker_init_fn=ignore_stop_signals,
        )

    @property
    def iters_per_epoch(self) -> int:
        return self.sampler.iters_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_batch)
        return iter(self.loader)

    def close(self) -> None:
        self.loader = None

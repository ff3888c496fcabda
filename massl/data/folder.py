"""Image-folder input: class sub-folders (labels) or a flat folder, read with random access."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..config import ConfigError
from ..signals import ignore_stop_signals
from .batch import Batch, collate
from .prepare import DevicePrepare
from .files import scan_image_folder
from .multicrop import DECODE_ERRORS, MultiCropAugmentation, sample_rng
from .watch import reading
from .webdataset import warn


class MultiCropFolder(torch.utils.data.Dataset):
    """Indexed by (epoch, index). An unreadable image is replaced by the next readable one: one
    replaced sample, whatever the number of unreadable files passed over, which are returned
    for the main process to name (once, whichever worker met them)."""

    MAX_REPLACEMENTS = 16

    def __init__(self, root: str, transform: MultiCropAugmentation, seed: int):
        self.paths, self.labels, self.classes = scan_image_folder(root)
        self.transform, self.seed = transform, seed
        self.timeout = 0.0  # data.timeout_s, set by the source: the bound on one file's read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = key
        unreadable = []
        for skipped in range(self.MAX_REPLACEMENTS):
            i = (index + skipped) % len(self.paths)
            try:
                with reading(self.paths[i], self.timeout), open(self.paths[i], "rb") as f:
                    data = f.read()
                views = self.transform.load(data, sample_rng(self.seed, epoch, i))  # JPEG draft mode, or the device
                return views, int(skipped > 0), i, tuple(unreadable)
            except DECODE_ERRORS as e:
                unreadable.append((self.paths[i], f"{type(e).__name__}: {e}"))
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
        aug = MultiCropAugmentation(d, photometric_on_device=gpu_augment)
        self.dataset = MultiCropFolder(d.path, aug, seed)
        self.dataset.timeout = d.timeout_s
        self.prepare = DevicePrepare(d, aug.on_device, aug)
        self.sampler = EpochSampler(len(self.dataset), d.batch_size, rank, world, seed)
        self.named: set[str] = set()  # unreadable files already reported
        if self.sampler.iters_per_epoch == 0:
            raise ConfigError(f"data.path: {d.path!r} has {len(self.dataset)} images, fewer than one global batch "
                              f"({world} ranks x data.batch_size {d.batch_size}); lower data.batch_size")
        self.loader: Optional[torch.utils.data.DataLoader] = torch.utils.data.DataLoader(
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
        assert self.loader is not None, "epoch() after close()"
        for batch in self.loader:
            for path, reason in batch.unreadable:
                if path not in self.named:
                    self.named.add(path)
                    warn(f"skipping unreadable image {path} ({reason})")
            yield batch

    def close(self) -> None:
        self.loader = None

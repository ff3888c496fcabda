"""Input pipelines. A DataSource has `iters_per_epoch` (equal on every rank), `epoch(epoch,
start_batch)` yielding Batches for this rank, `prepare(batch, device)` -> list of V crop tensors
on the device, and `close()`."""
from __future__ import annotations

from ..config import Config
from .folder import Batch, ImageFolderSource


def build_data(cfg: Config, rank: int, world: int, device_type: str = "cpu"):
    d = cfg.data
    if d.source == "imagefolder":
        return ImageFolderSource(d, cfg.run.seed, rank, world, pin_memory=device_type == "cuda")
    raise NotImplementedError(f"data.source={d.source!r} is not available yet")


__all__ = ["Batch", "build_data"]

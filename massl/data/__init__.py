"""Input pipelines. A DataSource has `iters_per_epoch` (equal on every rank), `epoch(epoch,
start_batch)` yielding Batches (batch.py) for this rank, `prepare(batch, device)` -> list of V
normalised float crop tensors on the device, and `close()`.

Nothing heavy is imported here: `massl.data.shards`, `massl.data.epoch_plan` and
`massl.data.files` need neither torch nor PIL (the sharding tool's processes import them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

if TYPE_CHECKING:  # only for the annotations: torch and the pipelines stay unimported here
    import torch

    from ..config import Config
    from .batch import Batch


class DataSource(Protocol):
    """What the training loop asks of an input pipeline (module docstring)."""

    @property
    def iters_per_epoch(self) -> int: ...  # the same on every rank

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator["Batch"]: ...

    def prepare(self, batch: "Batch", device: "torch.device") -> list["torch.Tensor"]: ...

    def close(self) -> None: ...


def build_data(cfg: "Config", rank: int, world: int, device_type: str = "cpu") -> DataSource:
    d = cfg.data
    pin = device_type == "cuda"
    # auto: photometric ops on the GPU when there is one (the CPU then only decodes and crops)
    on_device = d.gpu_augment == "true" or (d.gpu_augment == "auto" and device_type == "cuda")
    if d.source == "imagefolder":
        from .folder import ImageFolderSource

        return ImageFolderSource(d, cfg.run.seed, rank, world, pin_memory=pin, gpu_augment=on_device)
    if d.source == "webdataset":
        from .webdataset import WebDatasetSource, require_webdataset  # webdataset is an optional dependency

        require_webdataset()
        return WebDatasetSource(d, cfg.run.seed, rank, world, pin_memory=pin, gpu_augment=on_device)
    raise ValueError(f"data.source: unknown source {d.source!r}")


__all__ = ["DataSource", "build_data"]

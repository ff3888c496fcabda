"""Input pipelines. A DataSource has `iters_per_epoch` (equal on every rank), `epoch(epoch,
start_batch)` yielding Batches (batch.py) for this rank, `prepare(batch, device)` -> list of V
normalised float crop tensors on the device, and `close()`.

Nothing heavy is imported here: `massl.data.shards`, `massl.data.epoch_plan` and
`massl.data.files` need neither torch nor PIL (the sharding tool's processes import them).
"""
from __future__ import annotations


def build_data(cfg, rank: int, world: int, device_type: str = "cpu"):
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


__all__ = ["build_data"]

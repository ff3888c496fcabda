"""The move of a Batch to the device: normalised float crops, with the photometric ops (and with
data.decode=device the JPEG decode) run there."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ..config import DataConfig
from .augment.device import GpuAugment, normalize
from .batch import Batch

if TYPE_CHECKING:
    from .device_decode import DeviceDecoder
    from .multicrop import MultiCropAugmentation


class DevicePrepare:
    """Batch -> V normalised float32 crop tensors on the device; with data.gpu_augment the
    photometric ops run there first (augment/device.py), with data.decode=device the JPEG decode,
    crops and resizes before them (device_decode.py)."""

    def __init__(self, d: DataConfig, on_device: bool = False, aug: Optional[MultiCropAugmentation] = None):
        self.mean, self.std = list(d.aug.mean), list(d.aug.std)
        self.augment = GpuAugment(self.mean, self.std) if on_device else None
        self.decoder: Optional[DeviceDecoder] = None
        if d.decode == "device":
            from .device_decode import DeviceDecoder  # torchvision.io only where it is used

            assert aug is not None, "data.decode=device needs the sources' MultiCropAugmentation"
            self.decoder = DeviceDecoder(aug)

    def __call__(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        if batch.encoded is not None:
            assert self.decoder is not None  # only data.decode=device batches carry encoded JPEGs
            views = self.decoder(batch, device)
        else:
            views = [c.to(device, non_blocking=True) for c in batch.crops]
        if batch.params is None:
            return [normalize(crops, self.mean, self.std) for crops in views]
        assert self.augment is not None  # parameter rows come only with on_device (the augmentation's)
        return [self.augment(crops, params) for crops, params in zip(views, batch.params)]

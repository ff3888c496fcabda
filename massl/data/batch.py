"""The Batch a DataSource yields and its collate function (its move to the device: prepare.py)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch



class EncodedBatch(NamedTuple):
    """data.decode=device: the batch's JPEGs, decoded in prepare() (device_decode.py)."""

    data: torch.Tensor  # uint8 [total bytes]: the files one after another
    offsets: torch.Tensor  # int64 [n + 1]: file k is data[offsets[k]:offsets[k + 1]]
    rows: torch.Tensor  # int64 [n]: the batch rows they fill
    boxes: torch.Tensor  # int64 [n, V, 4]: crop boxes (left, top, width, height) in full-resolution pixels


@dataclass
class Batch:
    """One rank's batch. Mutable: prepare() adds the samples it had to replace or cut on the CPU
    (data.decode=device) to `skipped` and `fallback`, which the loop reads after it."""

    crops: list  # V uint8 tensors [B', 3, H, W], fully augmented or (with `params`) only cropped; B' = B - n
    skipped: int  # unreadable samples replaced in this batch (prepare() adds those it finds)
    params: Optional[list] = None  # photometric ops on the device: V float tensors [B, NUM_PARAMS] (augment/draw.py PARAM_NAMES)
    keys: tuple = ()  # sample ids: webdataset keys, image-folder indices
    encoded: Optional[EncodedBatch] = None  # data.decode=device: the n JPEGs the device decodes
    fallback: int = 0  # data.decode=device: samples that took the CPU path (not plain JPEGs, refused by the device)
    unreadable: tuple = ()  # (file, reason) of each unreadable file passed over, for the source to name

    def pin_memory(self) -> "Batch":  # the DataLoader's pin thread calls this (a dataclass is not a namedtuple)
        def pin(tensors):
            return [t.pin_memory() for t in tensors]

        encoded = EncodedBatch(*pin(self.encoded)) if self.encoded is not None else None
        return Batch(pin(self.crops), self.skipped, pin(self.params) if self.params is not None else None,
                     self.keys, encoded, self.fallback, self.unreadable)


def collate(samples) -> Batch:
    """samples: (multicrop.Views, skipped, key, unreadable) per image -> one Batch, stacked per view."""
    views = [s[0] for s in samples]
    cropped = [v.crops for v in views if v.encoded is None]
    crops = [torch.stack(c) for c in zip(*cropped)]
    params = None
    if views[0].params is not None:
        rows = torch.stack([v.params for v in views])  # [B, V, P]
        params = [rows[:, k].contiguous() for k in range(rows.shape[1])]
    encoded = None
    sent = [(i, v.encoded) for i, v in enumerate(views) if v.encoded is not None]
    if sent:
        offsets = [0, *itertools.accumulate(len(e.data) for _, e in sent)]
        encoded = EncodedBatch(torch.frombuffer(bytearray(b"".join(e.data for _, e in sent)), dtype=torch.uint8),
                               torch.tensor(offsets), torch.tensor([i for i, _ in sent]),
                               torch.tensor([e.boxes for _, e in sent]))
    return Batch(crops, sum(s[1] for s in samples), params, tuple(s[2] for s in samples), encoded,
                 sum(v.fallback for v in views), tuple(u for s in samples for u in s[3]))

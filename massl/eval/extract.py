"""Feature extraction of a labelled input (inputs.py), on one process or split over a process group.

The samples are cut into global batches of `batch_size` sample numbers; rank r takes the r-th
contiguous block of batches and each loader worker a contiguous block of its rank's batches, so
a batch holds the same images whatever the number of ranks and workers. Rows come back to the
main rank in sample order, with no padding and no duplicates; an unreadable image gives no row
and is counted and named instead. Every rank runs the same number of forward passes (a rank
short of a batch runs one on a blank image), which a sharded (FSDP) backbone needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms as T

from ..dist import gather_rows_to_main, world_of
from ..errors import UserError
from ..logging import log
from ..progress import format_duration
from ..signals import ignore_stop_signals

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

WARN_SKIPPED = 20  # unreadable images named in warnings per extraction and rank (all are counted)


def eval_transform(mean, std, size: int, crop_ratio: float = 0.875):
    """PIL RGB image -> normalised float tensor: bicubic resize of the short side to size/crop_ratio,
    centre crop of size x size (DINO's evaluation transform; crop_ratio 1 keeps the whole image)."""
    return T.Compose([T.Resize(int(round(size / crop_ratio)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector is. Default: the backbone's output (its CLS token, or the mean of the
    patch tokens under model.pooling=mean). With `n_last_blocks` > 1 or `avgpool` (DINOv2's
    linear-probe inputs): the CLS tokens of the last n blocks, each after the final norm, then
    optionally the average of the last block's patch tokens, concatenated."""

    n_last_blocks: int = 1
    avgpool: bool = False

    @property
    def plain(self) -> bool:
        return self.n_last_blocks == 1 and not self.avgpool

    def __call__(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return backbone(x)
        # only a timm ViT (models.build_backbone) has blocks: massl-eval refuses these specs for --weights pixels
        vit = cast("VisionTransformer", backbone)
        # intermediates_only with prefix tokens: (patch tokens, prefix tokens) per block, a case
        # timm's return annotation does not spell out
        layers = cast("list[tuple[torch.Tensor, torch.Tensor]]",
                      vit.forward_intermediates(x, indices=self.n_last_blocks, return_prefix_tokens=True, norm=True,
                                               intermediates_only=True, output_fmt="NLC"))
        parts = [prefix[:, 0] for _, prefix in layers]
        if self.avgpool:
            parts.append(layers[-1][0].mean(dim=1))
        return torch.cat(parts, dim=-1)


@dataclass
class Features:
    feats: torch.Tensor  # [N, d] float32, as the backbone gives them (not normalised)
    labels: torch.Tensor  # [N] int64, positions in `classes`
    index: torch.Tensor  # [N] int64, the sample numbers of the rows
    classes: list[str]
    skipped: list = field(default_factory=list)  # (sample number, name, reason) of the unusable images


def batch_ranges(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's global batches (lo, hi): the rank-th of `world` contiguous blocks of batches."""
    batches = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    per, extra = divmod(len(batches), world)
    first = rank * per + min(rank, extra)
    return batches[first:first + per + (rank < extra)]


class _Batches(torch.utils.data.IterableDataset):
    """Collated batches (images, labels, sample numbers, usable mask, failures) of `ranges`; each
    loader worker reads a contiguous block of them as one sequential pass over the input."""

    def __init__(self, data, ranges: list, transform, image_size: int):
        self.data, self.ranges, self.transform, self.size = data, ranges, transform, image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = batch_ranges(len(self.ranges), 1, info.id, info.num_workers) if info else [(0, len(self.ranges))]
        ranges = self.ranges[mine[0][0]:mine[-1][1]] if mine else []
        if not ranges:
            return
        samples = self.data.read(ranges[0][0], ranges[-1][1])
        for lo, hi in ranges:
            x = torch.zeros(hi - lo, 3, self.size, self.size)
            labels, ok, failed = torch.zeros(hi - lo, dtype=torch.long), torch.zeros(hi - lo, dtype=torch.bool), []
            for j in range(hi - lo):
                s = next(samples)
                if s.image is None:
                    failed.append((s.index, s.name, s.error))
                    continue
                x[j], labels[j], ok[j] = self.transform(s.image), s.label, True
            yield x, labels, torch.arange(lo, hi), ok, failed


def check_classes(train_classes: list[str], val_classes: list[str], train_name: str = "--train",
                  val_name: str = "--val") -> None:
    """Refuse a val set with classes the train set lacks: before any extraction (hours on ImageNet)."""
    known = set(train_classes)
    unknown = [c for c in val_classes if c not in known]
    if unknown:
        raise UserError(f"{val_name} has {len(unknown)} class(es) that {train_name} lacks, e.g. {unknown[0]!r}")


def unusable(name: str, path: str, feats: Features, total: int) -> str:
    """Why a set cannot be evaluated ("" when it can): no usable image at all."""
    if len(feats.labels):
        return ""
    why = f"none of its {total} image(s) could be read" if total else "it holds no images"
    first = f" (first: {feats.skipped[0][1]}: {feats.skipped[0][2]})" if feats.skipped else ""
    return f"{name} {path!r}: {why}{first}"


def align_labels(train_classes: list[str], val: Features) -> None:
    """Renumber `val`'s labels to the train set's classes, matched by name (an image folder's
    classes are sorted by name, a shard manifest's by index)."""
    check_classes(train_classes, val.classes)
    position = {c: i for i, c in enumerate(train_classes)}
    val.labels = torch.tensor([position[c] for c in val.classes], dtype=torch.long)[val.labels]
    val.classes = list(train_classes)


@torch.no_grad()
def extract_features(backbone: nn.Module, data, transform, image_size: int, batch_size: int = 256,
                     workers: int = 2, device: torch.device | str = "cpu", group=None,
                     spec: FeatureSpec = FeatureSpec(), progress: bool = True,
                     label: str = "") -> Optional[Features]:
    """Features of every usable sample of `data`, on the group's rank 0 (None on the others).
    Collective when `group` has several ranks: call it on all of them. `label` (train, val)
    names the input in the progress lines."""
    device = torch.device(device)
    rank, world = world_of(group)
    if len(data) == 0:
        raise UserError("the evaluation input holds no samples")
    ranges = batch_ranges(len(data), batch_size, rank, world)
    loader = torch.utils.data.DataLoader(
        _Batches(data, ranges, transform, image_size), batch_size=None, num_workers=workers,
        generator=torch.Generator(),  # its own: starting the loader draws no number from the global RNG
        worker_init_fn=ignore_stop_signals if workers else None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return spec(backbone, x.to(device, non_blocking=True)).float()

    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    skipped: list[tuple[int, str, str]] = []  # (sample number, name, reason)
    done, t0 = 0, time.perf_counter()
    for x, y, idx, ok, failed in loader:
        feats.append(forward(x)[ok.to(device)].cpu())
        labels.append(y[ok])
        index.append(idx[ok])
        for i, name, reason in failed:
            if len(skipped) < WARN_SKIPPED:
                log.warning(f"massl eval: skipping image {name}: {reason}")
            elif len(skipped) == WARN_SKIPPED:
                log.warning("massl eval: more unreadable images; they are counted, not named here")
            skipped.append((i, name, reason))
        done += len(idx)
        if progress and rank == 0 and len(feats) % 20 == 0:
            rate = done / (time.perf_counter() - t0)
            total = sum(hi - lo for lo, hi in ranges)
            log.info(f"  features{f' ({label})' if label else ''}: {done}/{total} on rank 0 ({rate:.0f} img/s, "
                     f"eta {format_duration((total - done) / rate)})")
    for _ in range(len(batch_ranges(len(data), batch_size, 0, world)) - len(ranges)):  # the collective count
        feats.append(forward(torch.zeros(1, 3, image_size, image_size))[:0].cpu())
    all_feats, all_labels, all_index = (
        gather_rows_to_main(torch.cat(t) if t else torch.zeros(0, dtype=torch.long), group)
        for t in (feats, labels, index))
    if world > 1:
        # placeholders on rank 0, each replaced by one rank's list
        everyone: Optional[list[Any]] = [None] * world if rank == 0 else None
        dist.gather_object(skipped, everyone, group_dst=0, group=group)
        skipped = [s for part in everyone for s in part] if everyone is not None else skipped
    if rank != 0:
        return None
    # rank 0 holds the gathered rows (gather_rows_to_main gives None only on the other ranks)
    assert all_feats is not None and all_labels is not None and all_index is not None
    order = all_index.argsort()  # loader workers interleave their batches
    return Features(all_feats[order], all_labels[order], all_index[order], list(data.classes), sorted(skipped))

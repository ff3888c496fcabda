"""data.decode=device: JPEG decode, crop and resize batched on the device, in `prepare()`.

The workers only parse each JPEG's header, draw its crops from the sample's RNG exactly as the
CPU path does (`MultiCropAugmentation.load`), and send the file's bytes with the crop boxes and
the photometric parameter rows. Here the batch's JPEGs are decoded with
`torchvision.io.decode_jpeg` (nvJPEG on CUDA, libjpeg-turbo on the CPU device), all crops are
cut and resized with two batched matrix products per group of similarly sized images (the
antialiased bicubic/bilinear filter of PIL and torch, as separable weight matrices), rounded to
uint8 as theirs, and handed to augment/device.py's photometric ops like the workers' crops.

Samples the workers did not send as JPEG bytes (other formats, CMYK, files cut short) arrive as
crops, flagged in Batch.fallback. Damaged JPEGs never get here: the workers refuse them with the
CPU path's decoder (MultiCropAugmentation.load), since the decoders here would accept some. A JPEG the device cannot decode is cut on the CPU here, from
its bytes and with its own boxes (Batch.fallback too); one that does not decode at all is
replaced by another sample of its batch and counted in Batch.skipped.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional, cast

import torch
from PIL import Image

from ..logging import log
from .batch import Batch
from .multicrop import DECODE_ERRORS, CropParams, MultiCropAugmentation

# Bound on one group's float working set (padded images and the vertically resampled crops):
# 2^26 floats = 256 MiB, so a batch of large photos is processed in several groups.
MAX_GROUP_FLOATS = 1 << 26
# A group admits an image while the padding to its largest height and width stays under this
# fraction of the group's pixels (landscape and portrait photos end up in separate groups).
MAX_PADDING = 0.25


def bicubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic with a = -0.5: the kernel of PIL's and torch's antialiased bicubic resize."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def triangle(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp_(min=0)


FILTERS = {"bicubic": bicubic, "bilinear": triangle}


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int, mode: str) -> torch.Tensor:
    """[n, size, extent]: row i holds the weights of output sample i of resizing the pixels
    [start, start + length) of an axis of `extent` pixels to `size` samples, as PIL's and
    torch's antialiased resize compute them (the filter stretched by the downscale factor, cut
    at the crop's edges, normalised per output sample)."""
    scale = length / size
    stretch = scale.clamp(min=1.0)
    centre = scale[:, None] * (torch.arange(size, device=start.device) + 0.5)  # relative to start
    x = torch.arange(extent, device=start.device)[None, :] - start[:, None]  # [n, extent]
    w = FILTERS[mode]((x[:, None, :] - centre[:, :, None] + 0.5) / stretch[:, None, None])
    w = w * ((x >= 0) & (x < length[:, None]))[:, None, :]
    return w / w.sum(-1, keepdim=True)


def size_groups(shapes: list[tuple[int, int]], columns: int) -> list[list[int]]:
    """Indices of `shapes` (H, W) in groups padded to a common size: ascending area, a new group
    when padding would pass MAX_PADDING or the group's floats (g x 3 x H x max(W, columns), its
    padded images or its horizontally resampled crops) would pass MAX_GROUP_FLOATS."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], shapes[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    h_max, w_max, area = 0, 0, 0
    for i in order:
        h, w = shapes[i]
        hm, wm, a, g = max(h_max, h), max(w_max, w), area + h * w, len(current) + 1
        if current and (g * hm * wm > (1 + MAX_PADDING) * a or g * 3 * hm * max(wm, columns) > MAX_GROUP_FLOATS):
            groups.append(current)
            current, hm, wm, a = [], h, w, h * w
        current.append(i)
        h_max, w_max, area = hm, wm, a
    return groups + [current] if current else groups


def resize_group(images: list[torch.Tensor], boxes: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 [3, H_k, W_k] images and their crop boxes [g, n, 4] (left, top, width, height) ->
    the n crops of each, resized to size x size: uint8 [g, n, 3, size, size].

    Crop-and-resize is linear and separable, crop = Wy @ image @ Wx^T per channel, with Wy
    [size, H] and Wx [size, W] zero outside the box; the horizontal pass runs first and is
    rounded to uint8 levels, as PIL and torch's uint8 resize do. Images are padded to the
    group's largest height and width (the weights ignore the padding) and laid out [g, 3H, W],
    so both passes are plain batched matmuls, the first over all n crops at once."""
    g, n = boxes.shape[:2]
    h_max, w_max = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    canvas = images[0].new_zeros((g, 3, h_max, w_max), dtype=torch.float32)
    for k, im in enumerate(images):
        canvas[k, :, :im.shape[1], :im.shape[2]] = im
    boxes = boxes.to(canvas.device, torch.float32).flatten(0, 1)
    wx = resample_weights(boxes[:, 0], boxes[:, 2], size, w_max, mode).view(g, n * size, w_max)
    wy = resample_weights(boxes[:, 1], boxes[:, 3], size, h_max, mode)  # [g * n, size, h_max]
    rows = torch.bmm(canvas.view(g, 3 * h_max, w_max), wx.transpose(1, 2)).round_().clamp_(0, 255)
    rows = rows.view(g, 3, h_max, n, size).permute(0, 3, 2, 1, 4).reshape(g * n, h_max, 3 * size)
    out = torch.bmm(wy, rows).view(g, n, size, 3, size).permute(0, 1, 3, 2, 4)  # [g, n, 3, size, size]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """uint8 [3, H, W] per blob on `device`, None where the decoder failed. One batched call;
    if it fails (it returns nothing for any error), each blob alone, to find the bad ones."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for b in blobs:
                try:
                    out.append(decode_jpeg([b], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    out.append(None)
            return out


class DeviceDecoder:
    """Batch with `encoded` JPEGs -> V uint8 crop tensors [B, 3, S, S] on the device, in batch
    order; updates the batch's fallback and skipped counts for what it had to handle here."""

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug
        self.classes: dict[int, list[int]] = {}  # crop size -> the views of that size (2 global, L local)
        for v, s in enumerate(aug.sizes):
            self.classes.setdefault(s, []).append(v)
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        if device.type != "cuda":
            return self.decode(batch, device)
        # Decode and resize on a side stream, overlapping the step queued on the current one. The
        # side stream is drained first: nvJPEG's hardware decoder can write its outputs before
        # work already queued on its stream has run, into memory that work still reads
        # (pytorch/vision#9606); nothing of ours is queued there by then.
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = self.streams.setdefault(device, torch.cuda.Stream(device))
        stream.synchronize()
        with torch.cuda.stream(stream):
            out = self.decode(batch, device)
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for t in out:
            t.record_stream(current)
        return out

    def decode(self, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        # only batches with encoded JPEGs get here, and they always carry parameter rows
        # (data.decode=device runs the photometric ops on the device)
        enc, params = batch.encoded, batch.params
        assert enc is not None and params is not None
        size_b = len(params[0])
        out = [torch.empty((size_b, 3, s, s), dtype=torch.uint8, device=device) for s in self.aug.sizes]
        dev_rows = enc.rows.tolist()
        cpu_rows = sorted(set(range(size_b)) - set(dev_rows))
        if cpu_rows:  # the workers' CPU-path samples
            index = torch.tensor(cpu_rows, device=device)
            for v, crops in enumerate(batch.crops):
                out[v].index_copy_(0, index, crops.to(device, non_blocking=True))
        offsets = enc.offsets.tolist()
        blobs = [enc.data[offsets[k]:offsets[k + 1]] for k in range(len(dev_rows))]
        images = decode_jpegs(blobs, device)
        decoded = [k for k, im in enumerate(images) if im is not None]
        good = [im for im in images if im is not None]  # images[k] for k in decoded
        self.resize_into(out, good, enc.boxes[decoded], [dev_rows[k] for k in decoded], device)
        dead = []
        for k, im in enumerate(images):
            if im is None and not self.cpu_fallback(out, blobs[k], enc.boxes[k], dev_rows[k], batch, device):
                dead.append(dev_rows[k])
        if dead:
            self.replace(out, batch, dead)
        return out

    def resize_into(self, out: list[torch.Tensor], images: list[torch.Tensor], boxes: torch.Tensor,
                    rows: list[int], device: torch.device) -> None:
        if not images:
            return
        columns = max(len(views) * s for s, views in self.classes.items())
        shapes = [cast(tuple[int, int], tuple(im.shape[1:])) for im in images]  # (H, W) of [3, H, W]
        for group in size_groups(shapes, columns):
            index = torch.tensor([rows[k] for k in group], device=device)
            for s, views in self.classes.items():
                crops = resize_group([images[k] for k in group], boxes[group][:, views], s, self.aug.mode)
                for j, v in enumerate(views):
                    out[v].index_copy_(0, index, crops[:, j])

    def cpu_fallback(self, out: list[torch.Tensor], blob: torch.Tensor, boxes: torch.Tensor, row: int,
                     batch: Batch, device: torch.device) -> bool:
        """Cut a JPEG the device could not decode on the CPU; False if it does not decode at all."""
        key = batch.keys[row]
        try:
            data = blob.numpy().tobytes()
            with Image.open(io.BytesIO(data)) as img:
                crops = self.aug.cropped(img, [CropParams(box=tuple(b)) for b in boxes.tolist()], data)
        except DECODE_ERRORS as e:
            log.warning(f"massl data: skipping sample {key!r}: it decodes neither on the device nor on the CPU "
                        f"({type(e).__name__}: {e})")
            return False
        log.warning(f"massl data: sample {key!r}: the device decoder refused it; cut on the CPU")
        for v, c in enumerate(crops):
            out[v][row] = c.to(device)
        batch.fallback += 1
        return True

    @staticmethod
    def replace(out: list[torch.Tensor], batch: Batch, dead: list[int]) -> None:
        """Each undecodable sample becomes a copy of the next usable one of the batch (crops and
        parameters), so the batch keeps its size; counted in batch.skipped."""
        params = batch.params
        assert params is not None  # decode() checked it
        alive = sorted(set(range(len(params[0]))) - set(dead))
        if not alive:
            raise RuntimeError(f"no sample of a batch decodes ({len(dead)} JPEGs); "
                               f"check the data with `massl-shard verify` or use data.decode=cpu")
        for row in dead:
            src = next((r for r in alive if r > row), alive[0])
            for v in range(len(out)):
                out[v][row] = out[v][src]
                params[v][row] = params[v][src]
        batch.skipped += len(dead)

"""data.source=webdataset: tar shards streamed per rank and DataLoader worker (docs/data.md).

Shards come from data.urls: a folder holding a manifest, or '::'-separated brace patterns of
local paths and `pipe:` commands (e.g. `pipe:aws s3 cp s3://b/train-{000000..000099}.tar -`).
Per-shard sample counts come from the manifest massl-shard writes (data.manifest, by default
manifest.json beside the shards). epoch_plan.py decides who reads what; this module reads,
shuffles, decodes and augments.

A sample that cannot be used is replaced, counted in Batch.skipped and reported on stderr, so
every rank still yields exactly iters_per_epoch batches: one a shard did not deliver (cut
short, unreadable, a failing pipe) by the next delivered sample, one that does not decode by
the next decodable sample of its shuffle block.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterator, Optional

import torch

from ..config import ConfigError
from ..errors import UserError
from ..logging import log
from ..signals import ignore_stop_signals
from .batch import Batch, collate
from .prepare import DevicePrepare
from .epoch_plan import block_permutation, epoch_pieces, resume_point, worker_span
from .files import image_extension
from .multicrop import DECODE_ERRORS, MultiCropAugmentation, sample_rng
from .watch import reading
from .shards import MANIFEST_NAME, SHARD_ERRORS, expand_shard_urls, iter_samples, open_tar, read_shard_manifest


def require_webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise UserError("data.source=webdataset needs the webdataset package: "
                        "pip install 'massl[webdataset]' (webdataset==1.0.2)") from e
    return webdataset


def warn(message: str) -> None:
    log.warning(f"massl data: {message}")


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def shard_name(url: str) -> str:
    """The file name a URL refers to: the basename of a path, or of the last '.tar' word of a pipe: command."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url
    return os.path.basename(url.split("?", 1)[0].rstrip("/"))


def find_manifest(urls_setting: str, manifest_setting: str, urls: list[str]) -> str:
    if manifest_setting:
        return manifest_setting
    if os.path.isdir(urls_setting):
        return os.path.join(urls_setting, MANIFEST_NAME)
    if urls and is_local(urls[0]):
        return os.path.join(os.path.dirname(os.path.abspath(urls[0])), MANIFEST_NAME)
    raise ConfigError("data.manifest: shards behind pipe: or remote URLs need a local copy of their manifest.json; "
                      "set data.manifest to its path")


def shard_counts(urls: list[str], manifest: dict, manifest_path: str) -> list[int]:
    by_name = {s["name"]: int(s["samples"]) for s in manifest["shards"]}
    missing = [u for u in urls if shard_name(u) not in by_name]
    if missing:
        raise ConfigError(f"data.urls: {len(missing)} shard(s) are not in {manifest_path}, e.g. {missing[0]!r}; "
                          f"point data.manifest at the manifest that lists them (massl-shard index writes one)")
    return [by_name[shard_name(u)] for u in urls]


def read_slots(urls: list[str], pieces, timeout: float = 0.0) -> Iterator[Optional[tuple[str, dict]]]:
    """The samples of `pieces` in order; None for each sample a damaged shard did not deliver.
    Each sample's read is bounded by `timeout` seconds (data.timeout_s; 0: unbounded)."""
    gopen = require_webdataset().gopen
    for piece in pieces:
        url, wanted = urls[piece.shard], piece.stop - piece.start
        got, error, stream = 0, None, None
        try:
            with reading(url, timeout):
                stream = gopen(url, "rb")
                samples = iter_samples(open_tar(stream), skip=piece.start)
            while got < wanted:
                with reading(url, timeout):
                    sample = next(samples, None)
                if sample is None:
                    break
                yield sample
                got += 1
        except SHARD_ERRORS as e:
            error = e
        except BaseException:  # a timeout, a stop signal, the reader abandoned: not the shard's fault
            proc = getattr(stream, "proc", None)
            if proc is not None:  # a pipe: command: close() would wait for it to end
                proc.kill()
            raise
        finally:
            if stream is not None:
                try:
                    stream.close()
                except SHARD_ERRORS as e:  # a pipe: command we stopped reading early may exit non-zero
                    error = error or (e if got < wanted else None)
        if got < wanted:
            reason = f"{type(error).__name__}: {error}" if error else "it holds fewer samples than its manifest says"
            warn(f"shard {url}: {wanted - got} sample(s) missing from sample {piece.start + got} on ({reason})")
            yield from itertools.repeat(None, wanted - got)


def fill_missing(slots: Iterator[Optional[tuple]], where: str) -> Iterator[tuple[str, dict, bool]]:
    """(key, files, replaced): each missing sample becomes the next delivered one (the last one
    at the end), so a lost stretch of any length costs only a count, not memory."""
    missing, last = 0, None
    for s in slots:
        if s is None:
            missing += 1
            continue
        for _ in range(missing):
            yield (*s, True)
        missing, last = 0, s
        yield (*s, False)
    if missing:
        if last is None:
            raise RuntimeError(f"no shard delivered any sample for {where}; check the shards with `massl-shard verify`")
        for _ in range(missing):
            yield (*last, True)


class _Epoch(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker serves the batches resume_point assigns it."""

    def __init__(self, source: "WebDatasetSource", epoch: int, start_batch: int):
        self.source, self.epoch, self.start_batch = source, epoch, start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, first = resume_point(self.start_batch, info.id if info else 0, self.source.workers)
        return self.source.worker_batches(self.epoch, worker, first)


def _identity(batch):
    return batch


class WebDatasetSource:
    """DataSource over tar shards: `epoch(e, start)` yields this rank's Batches, `prepare` moves them."""

    def __init__(self, d, seed: int, rank: int, world: int, pin_memory: bool = False, gpu_augment: bool = False):
        try:
            self.urls = expand_shard_urls(d.urls)
        except UserError as e:  # a folder without a usable manifest
            raise ConfigError(f"data.urls: {e}") from None
        if not self.urls:
            raise ConfigError(f"data.urls: {d.urls!r} names no shards")
        if all(is_local(u) and not os.path.exists(u) for u in self.urls):  # else the error named data.manifest
            raise ConfigError(f"data.urls: {d.urls!r}: no such shard or folder (e.g. {self.urls[0]}); point it at "
                              f"the shards (massl-shard's output folder or a brace pattern of .tar files)")
        manifest_path = find_manifest(d.urls, d.manifest, self.urls)
        try:
            manifest = read_shard_manifest(manifest_path)
        except UserError as e:
            raise ConfigError(f"data.manifest: {e}") from None
        self.counts = shard_counts(self.urls, manifest, manifest_path)
        total = d.samples_per_epoch or sum(self.counts)
        if sum(self.counts) == 0:
            raise ConfigError(f"data.urls: the {len(self.urls)} shard(s) hold no samples")
        self.iters = total // (world * d.batch_size)
        if self.iters == 0:
            raise ConfigError(f"data.samples_per_epoch: {total} samples per epoch are fewer than one global batch "
                              f"({world} ranks x data.batch_size {d.batch_size}); lower data.batch_size")
        self.d, self.seed, self.rank, self.world = d, seed, rank, world
        self.batch, self.workers, self.buffer = d.batch_size, max(1, d.num_workers), max(1, d.shuffle_buffer)
        self.aug = MultiCropAugmentation(d, photometric_on_device=gpu_augment)
        self.prepare = DevicePrepare(d, self.aug.on_device, self.aug)
        self.pin_memory = pin_memory
        self._loader_iter: Optional[Iterator[Batch]] = None
        if rank == 0 and len(self.urls) < world * self.workers:
            warn(f"{len(self.urls)} shard(s) for {world} rank(s) x {self.workers} worker(s): readers share shards, "
                 f"each reading only its own samples (more shards spread the I/O better)")

    @property
    def iters_per_epoch(self) -> int:
        return self.iters

    def sample(self, block: list, perm: list[int], i: int, epoch: int, position: int, warned: set):
        """Decode and augment block[perm[i]], or (counted as one replaced sample) the next usable one after it."""
        for tries in range(len(block)):
            key, files, replaced = block[perm[(i + tries) % len(block)]]
            ext = image_extension(files)
            try:
                if ext is None:
                    raise ValueError(f"no image among {sorted(files)}")
                views = self.aug.load(files[ext], sample_rng(self.seed, epoch, position))
                return views, int(replaced or tries > 0), key, ()  # named by warn() below
            except DECODE_ERRORS as e:
                if key not in warned:
                    warned.add(key)
                    warn(f"skipping sample {key!r}: {type(e).__name__}: {e}")
        raise RuntimeError(f"no usable sample in a shuffle block of {len(block)} (epoch {epoch}, rank {self.rank}); "
                           f"check the shards with `massl-shard verify`")

    def worker_batches(self, epoch: int, worker: int, first_batch: int) -> Iterator[Batch]:
        """Batches first_batch.. of logical `worker` (its share of this rank's batches, in order)."""
        lo, hi = worker_span(self.rank, worker, self.iters, self.workers, self.batch)
        first, size = first_batch * self.batch, self.buffer
        if lo + first >= hi:
            return
        k0 = first // size
        pieces = epoch_pieces(self.counts, self.seed, epoch, lo + k0 * size, hi)
        slots = fill_missing(read_slots(self.urls, pieces, self.d.timeout_s), f"epoch {epoch}, rank {self.rank}, worker {worker}")
        pending: list[tuple] = []
        warned: set[str] = set()
        for k in range(k0, -(-(hi - lo) // size)):
            block = list(itertools.islice(slots, min(size, hi - lo - k * size)))
            perm = block_permutation(len(block), self.seed, epoch, self.rank, worker, k)
            for i in range(max(0, first - k * size), len(block)):
                pending.append(self.sample(block, perm, i, epoch, lo + k * size + i, warned))
                if len(pending) == self.batch:
                    yield collate(pending)
                    pending = []

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        dataset = _Epoch(self, epoch, start_batch)
        if self.d.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, collate_fn=_identity, num_workers=self.d.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=2, persistent_workers=False,
            worker_init_fn=ignore_stop_signals)
        self._loader_iter = loader_iter = iter(loader)
        return loader_iter

    def close(self) -> None:
        self._loader_iter = None

    def __getstate__(self) -> dict:  # what spawned DataLoader workers receive: not the running loader
        return {k: v for k, v in self.__dict__.items() if k != "_loader_iter"}

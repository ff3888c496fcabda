"""WebDataset tar shards and their manifest: the format `massl-shard` writes and the webdataset
source reads (docs/data.md, "The sharding tool").

A sample is a run of consecutive tar members sharing a key, the member path up to the first dot
of its file name (webdataset's convention): `000000123.jpg`, `000000123.cls`, `000000123.json`.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from typing import IO, Iterator, Optional

from ..errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "massl-shards"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# What a damaged shard raises while being read: truncated data, a bad header, a failed pipe: command.
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def split_member_name(name: str) -> tuple[str, Optional[str]]:
    """'dir/000001.seg.png' -> ('dir/000001', 'seg.png'); (name, None) when the file name has no dot."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return name, None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def open_tar(fileobj: IO[bytes]) -> tarfile.TarFile:
    """Seekable files are read with seeks over the members we skip; pipes are streamed."""
    try:
        seekable = fileobj.seekable()
    except (AttributeError, OSError):
        seekable = False
    return tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|")


def iter_samples(tar: tarfile.TarFile, skip: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield (key, {extension: bytes}) per sample, reading no data of the first `skip` samples.

    A read error propagates (the caller decides what a damaged shard means), after the sample
    being read is yielded if its image was read completely.
    """
    key, files, index = None, {}, -1
    try:
        while True:
            info = tar.next()
            tar.members = []  # tarfile keeps every header it read; a shard can hold millions
            if info is None:
                break
            k, ext = split_member_name(info.name)
            if not info.isfile() or ext is None:
                continue
            if k != key:
                if key is not None and index >= skip:
                    yield key, files
                key, files, index = k, {}, index + 1
            if index >= skip:
                files[ext] = tar.extractfile(info).read()
    except SHARD_ERRORS:
        if key is not None and index >= skip and image_extension(files):
            yield key, files
        raise
    if key is not None and index >= skip:
        yield key, files


def image_extension(files: dict) -> Optional[str]:
    return next((e for e in IMAGE_EXTENSIONS if e in files), None)


def sha256_file(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex digest, size in bytes)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def read_manifest(path: str) -> dict:
    """Load and sanity-check a manifest written by massl-shard (or `massl-shard index`); a
    UserError says what is wrong with it."""
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: does not exist; write the shards with massl-shard, or a manifest for "
                        f"existing shards with `massl-shard index`") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: is not readable JSON ({type(e).__name__}: {e}); rewrite it with "
                        f"`massl-shard index`") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise UserError(f"{path}: is not a massl-shard manifest (format {MANIFEST_FORMAT!r} with a shard list); "
                        f"write one with `massl-shard index`")
    for s in m["shards"]:
        if not isinstance(s, dict) or not {"name", "samples", "bytes", "sha256"} <= set(s):
            raise UserError(f"{path}: shard entry {s} lacks name, samples, bytes or sha256; rewrite it with "
                            f"`massl-shard index`")
    return m

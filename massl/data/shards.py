"""WebDataset tar shards and their manifest: the format `massl-shard` writes and the webdataset
source reads (docs/data.md, "The sharding tool").

A sample is a run of consecutive tar members sharing a key, the member path up to the first dot
of its file name (webdataset's convention): `000000123.jpg`, `000000123.cls`, `000000123.json`.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from typing import IO, Iterator, Optional, cast

from ..errors import UserError
from .files import image_extension

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "massl-shards"
MANIFEST_VERSION = 1
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
    key: Optional[str] = None
    files: dict[str, bytes] = {}
    index = -1
    try:
        while True:
            info = tar.next()
            # tarfile keeps every header it read; a shard can hold millions. (`members` is a real
            # TarFile attribute that typeshed's stub leaves out.)
            tar.members = []  # type: ignore[attr-defined]
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
                # a regular file (isfile() above): extractfile() returns its reader, never None
                files[ext] = cast(IO[bytes], tar.extractfile(info)).read()
    except SHARD_ERRORS:
        if key is not None and index >= skip and image_extension(files):
            yield key, files
        raise
    if key is not None and index >= skip:
        yield key, files


def shard_manifest(shards: list[dict], source: str, options: dict, classes: dict, skipped: list[dict]) -> dict:
    """The manifest of a set of shards (name, samples, bytes, sha256 each), as massl-shard writes it."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source, "options": options,
            "shards": [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards],
            "num_shards": len(shards), "total_samples": sum(s["samples"] for s in shards),
            "total_bytes": sum(s["bytes"] for s in shards), "classes": classes, "skipped": skipped}


def read_shard_manifest(path: str) -> dict:
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


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level_split(text: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, c in enumerate(text):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return parts + [text[last:]]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `a-{000..002}.tar` (zero-padded numeric ranges), `{x,y}`,
    nested; a group with neither is kept as written."""
    start = pattern.find("{")
    end = _closing_brace(pattern, start) if start >= 0 else -1
    if end < 0:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1:end], expand_braces(pattern[end + 1:])
    bounds = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if bounds:
        a, b = bounds.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        options = _top_level_split(body)
        if len(options) == 1:
            return [head + "{" + body + "}" + t for t in tail]
        options = [o for option in options for o in expand_braces(option)]
    return [head + o + t for o in options for t in tail]


def expand_shard_urls(urls: str) -> list[str]:
    """data.urls -> shard URLs: a folder holding a manifest (its shards), or '::'-separated brace
    patterns of paths and `pipe:` commands."""
    if os.path.isdir(urls):
        manifest = read_shard_manifest(os.path.join(urls, MANIFEST_NAME))
        return [os.path.join(urls, s["name"]) for s in manifest["shards"]]
    return [url for pattern in urls.split("::") for url in expand_braces(pattern)]

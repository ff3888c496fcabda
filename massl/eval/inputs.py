"""Labelled evaluation inputs: an image folder (class sub-folders) or WebDataset shards written by
massl-shard (the class in each sample's `cls` member, named by the manifest's `classes`).

Samples are numbered 0..N-1 (folder: sorted paths; shards: manifest order), and every reader
works on a contiguous range of those numbers, so that ranks and loader workers can each take a
disjoint part and the results be put back in order by number. An image that cannot be used is
reported as a failed sample (its number, a name, the reason), never raised.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from PIL import Image

from ..data.files import image_extension, scan_image_folder
from ..data.multicrop import DECODE_ERRORS
from ..data.shards import MANIFEST_NAME, SHARD_ERRORS, iter_samples, open_tar, read_shard_manifest
from ..errors import UserError
from ..image import to_rgb, upright


def open_rgb(fp) -> Image.Image:
    """The one place evaluation opens an image: a path or a binary file -> RGB pixels."""
    with Image.open(fp) as img:
        img.load()  # to_rgb returns an RGB image as is: its pixels must outlive the file
        return to_rgb(upright(img))


@dataclass
class Sample:
    index: int
    name: str  # a path or a shard member key, for messages
    label: int = -1  # index into the input's `classes`
    image: Optional[Image.Image] = None
    error: str = ""  # why the sample cannot be used (image is None)


class ImageFolderInput:
    """Class sub-folders of `root`; files directly in `root` have no label and are refused."""

    def __init__(self, root: str):
        self.root = root
        self.paths, self.labels, self.classes = scan_image_folder(root)
        if min(self.labels) < 0:
            raise UserError(f"{root!r} has images outside class sub-folders; evaluation needs labelled folders")

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> str:
        """Changes when a file is added, removed, replaced or relabelled (feature cache key)."""
        h = hashlib.sha256()
        for p, y in zip(self.paths, self.labels):
            st = os.stat(p)
            # the name as the filesystem has it: a non-UTF-8 name (surrogate escapes) encodes too
            h.update(os.fsencode(os.path.relpath(p, self.root)) + f"\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"folder:{os.path.abspath(self.root)}:{h.hexdigest()}"

    def read(self, lo: int, hi: int) -> Iterator[Sample]:
        for i in range(lo, hi):
            s = Sample(i, self.paths[i], self.labels[i])
            try:
                s.image = open_rgb(self.paths[i])
            except DECODE_ERRORS as e:
                s.error = f"{type(e).__name__}: {e}"
            yield s


class ShardInput:
    """Local shards listed by a massl-shard manifest (a folder holding manifest.json, or the file)."""

    def __init__(self, path: str):
        self.manifest_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
        manifest = read_shard_manifest(self.manifest_path)
        folder = os.path.dirname(os.path.abspath(self.manifest_path))
        self.urls = [os.path.join(folder, s["name"]) for s in manifest["shards"]]
        self.counts = [int(s["samples"]) for s in manifest["shards"]]
        by_index = {int(i): name for name, i in manifest.get("classes", {}).items()}
        if not by_index:
            raise UserError(f"{self.manifest_path}: the shards have no labels (manifest 'classes' is empty); "
                             f"write them from class sub-folders or a list with labels")
        # labels are positions in `classes`, sorted by the class index massl-shard wrote
        self.classes = [by_index[i] for i in sorted(by_index)]
        self.position = {i: p for p, i in enumerate(sorted(by_index))}
        self.digest = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return sum(self.counts)

    def identity(self) -> str:
        return f"shards:{os.path.abspath(self.manifest_path)}:{self.digest}"

    def read(self, lo: int, hi: int) -> Iterator[Sample]:
        start = 0
        for url, count in zip(self.urls, self.counts):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                yield from self._read_shard(url, start, a, b)
            start += count

    def _read_shard(self, url: str, offset: int, lo: int, hi: int) -> Iterator[Sample]:
        """Samples lo..hi-1 (global numbers) of the shard whose first sample is number `offset`."""
        i, error = lo, "the shard holds fewer samples than its manifest says"
        try:
            with open(url, "rb") as f:
                for key, files in iter_samples(open_tar(f), skip=lo - offset):
                    yield self._sample(i, f"{os.path.basename(url)}:{key}", files)
                    i += 1
                    if i == hi:
                        return
        except SHARD_ERRORS as e:
            error = f"{type(e).__name__}: {e}"
        for j in range(i, hi):  # samples the damaged shard did not deliver
            yield Sample(j, f"{os.path.basename(url)}:#{j - offset}", error=error)

    def _sample(self, index: int, name: str, files: dict) -> Sample:
        s = Sample(index, name)
        try:
            cls = int(files["cls"].decode())
            s.label = self.position[cls]
        except (KeyError, ValueError):
            s.error = "no class label (cls member) in the manifest's classes"
            return s
        ext = image_extension(files)
        try:
            if ext is None:
                raise ValueError(f"no image among {sorted(files)}")
            s.image = open_rgb(io.BytesIO(files[ext]))
        except DECODE_ERRORS as e:
            s.error = f"{type(e).__name__}: {e}"
        return s


def open_input(path: str):
    """A folder with a massl-shard manifest.json (or the manifest file) -> shards; a folder -> images."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return ShardInput(path)
    if not os.path.isdir(path):
        raise UserError(f"{path!r} is neither an image folder nor massl-shard shards (manifest.json)")
    return ImageFolderInput(path)

"""Which files are images, and the image-folder layout: one place, no torch or PIL (the sharding
tool's processes and `massl-shard index` import it)."""
from __future__ import annotations

import os
from typing import Optional

# Extensions read as images (lower case, no dot), in the order a shard sample's image is looked for.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# PIL format -> the extension massl-shard stores (what webdataset decoders key on).
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "PPM": "ppm"}


def is_image_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def image_extension(files: dict) -> Optional[str]:
    """The extension of the image among a shard sample's members ({extension: bytes})."""
    return next((e for e in IMAGE_EXTENSIONS if e in files), None)


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names). Sub-folders are classes; files directly in `root` get label -1."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels = [], []
    for f in sorted(os.listdir(root)):
        if is_image_file(f) and os.path.isfile(os.path.join(root, f)):
            paths.append(os.path.join(root, f))
            labels.append(-1)
    for ci, c in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, c)):
            dirnames.sort()
            for f in sorted(files):
                if is_image_file(f):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(ci)
    if not paths:
        raise ValueError(f"image folder {root!r} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes

"""Which files are images, and the image-folder layout: one place, no torch or PIL (the sharding
tool's processes and `massl-shard index` import it)."""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..errors import UserError

# Extensions read as images (lower case, no dot), in the order a shard sample's image is looked for.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# PIL format -> the extension massl-shard stores (what webdataset decoders key on).
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "PPM": "ppm"}


def is_image_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def image_extension(files: dict) -> Optional[str]:
    """The extension of the image among a shard sample's members ({extension: bytes})."""
    return next((e for e in IMAGE_EXTENSIONS if e in files), None)


class _Listing:
    """The entries of a folder walk that are used, and the count of those skipped (a warning)."""

    def __init__(self, root: str):
        self.root = root
        self.skipped: dict[str, list] = {}

    def skip(self, why: str, path: str) -> None:
        self.skipped.setdefault(why, []).append(path)

    def entries(self, folder: str) -> tuple[list[str], list[str]]:
        """(sub-folders, image files) of `folder`, by name. Only regular files are images (a FIFO
        or device would block the reader). A link to a file is that file, wherever it is (each
        such link is an explicit choice: subsets of a dataset are often made of links); a linked
        folder is never entered (a loop, a class duplicated or invented, a whole other tree)."""
        dirs, files = [], []
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(".") and folder == self.root and e.is_dir():
                    continue  # a hidden folder at the top is not a class
                if e.is_symlink() and os.path.isdir(e.path):
                    self.skip("linked folders (never entered: loops, duplicated classes, other trees)", e.path)
                    continue
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.name)
                elif is_image_file(e.name):
                    if e.is_file():  # follows a link inside the root; False for a FIFO, socket or device
                        files.append(e.name)
                    else:
                        self.skip("entries that are not regular files", e.path)
        return sorted(dirs), sorted(files)

    def walk(self, top: str) -> list[str]:
        """The image files under `top`, in sorted order, sub-folders depth first."""
        dirs, files = self.entries(top)
        out = [os.path.join(top, f) for f in files]
        for d in dirs:
            out += self.walk(os.path.join(top, d))
        return out

    def warn(self) -> None:
        for why, paths in self.skipped.items():
            logging.getLogger("massl").warning(
                f"warning: image folder {self.root!r}: skipped {len(paths)} {why}, e.g. {paths[0]!r}")


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names). Sub-folders are classes; files directly in `root` get label -1.
    Links to files are followed; linked folders and entries that are not regular files are
    skipped with one warning per kind."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    listing = _Listing(root)
    classes, top_files = listing.entries(root)
    paths = [os.path.join(root, f) for f in top_files]
    labels = [-1] * len(paths)
    for ci, c in enumerate(classes):
        found = listing.walk(os.path.join(root, c))
        paths += found
        labels += [ci] * len(found)
    listing.warn()
    if not paths:
        raise UserError(f"image folder {root!r}: holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)}); "
                        f"point it at a folder of images")
    return paths, labels, classes

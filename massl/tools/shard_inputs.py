"""Inputs of massl-shard: which images (and labels) to write, and each image's checked payload.

PIL is imported by the function that decodes (in the worker processes), not at import."""
from __future__ import annotations

import csv
import io
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Optional

from massl.data.files import FORMAT_EXTENSIONS, scan_image_folder
from massl.errors import UserError

HEADER_WORDS = ("path", "file", "filename", "image")


@dataclass(frozen=True)
class Item:
    path: str
    label: Optional[str]  # class name, None when unlabelled


def list_folder(root: str) -> list[Item]:
    """Class sub-folders become labels; images directly in `root` are unlabelled."""
    paths, labels, classes = scan_image_folder(root)
    return [Item(p, classes[i] if i >= 0 else None) for p, i in zip(paths, labels)]


def list_file(path: str) -> list[Item]:
    """A .csv with `path[,label]` rows (a header row naming the path column is skipped), or a text
    file with one `path` or `path<TAB>label` per line (# starts a comment). Relative paths are
    resolved against the list file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, newline="") as f:
        if path.lower().endswith(".csv"):
            rows = [r for r in csv.reader(f) if r and r[0].strip()]
            if rows and rows[0][0].strip().lower() in HEADER_WORDS:
                rows = rows[1:]
        else:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    rows.append(line.rsplit("\t", 1) if "\t" in line else [line])
    items = []
    for r in rows:
        p = r[0].strip()
        label = r[1].strip() if len(r) > 1 and r[1].strip() else None
        items.append(Item(p if os.path.isabs(p) else os.path.join(base, p), label))
    if not items:
        raise UserError(f"SOURCE {path}: lists no images")
    return items


def list_inputs(source: str) -> list[Item]:
    if os.path.isdir(source):
        return list_folder(source)
    if os.path.isfile(source):
        return list_file(source)
    raise UserError(f"SOURCE {source!r}: is neither an image folder nor a list file (.txt, .csv)")


def class_map(items: list[Item]) -> dict[str, int]:
    """Label name -> index: integer labels keep their value; other names are numbered in sorted order."""
    names = sorted({i.label for i in items if i.label is not None})
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: k for k, n in enumerate(names)}


def load_checked(path: str, max_side: int = 0, quality: int = 90) -> dict:
    """Read one image, decode it fully (the check), re-encode as JPEG when its longer side exceeds
    `max_side`. Returns {data, ext, width, height, bytes} or {error}."""
    from PIL import Image

    from massl.image import oriented_size, to_rgb, upright

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, oriented_size(img)  # as shown: kept bytes keep their EXIF orientation
            img.load()
            if max_side and max(w, h) > max_side:
                s = max_side / max(w, h)
                shown = to_rgb(upright(img))  # the re-encoded JPEG has no EXIF: turn the pixels instead
                shown = shown.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS,
                                     reducing_gap=3.0)
                out = io.BytesIO()
                shown.save(out, "JPEG", quality=quality)
                return {"data": out.getvalue(), "ext": "jpg", "width": w, "height": h, "bytes": len(data)}
        ext = FORMAT_EXTENSIONS.get(fmt or "") or os.path.splitext(path)[1].lstrip(".").lower() or "img"
        return {"data": data, "ext": ext, "width": w, "height": h, "bytes": len(data)}
    except Image.UnidentifiedImageError:
        return {"error": "UnidentifiedImageError: not an image format PIL can read"}
    except Exception as e:  # any failure to read or decode means: skip this file and list why
        return {"error": f"{type(e).__name__}: {e}"}


def exit_with_parent(parent: int) -> None:
    """Worker pool initializer: end this worker once massl-shard is gone. A pool worker waits on
    its task queue forever when the process that owns the pool is killed (kill -9, OOM killer)
    without shutting the pool down. Ctrl-C reaches the whole foreground process group: a worker
    ignores it (massl-shard itself stops, in one line, and shuts the pool down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="massl-shard-parent-watch", daemon=True).start()


def load_chunk(paths: list[str], max_side: int, quality: int) -> list[dict]:
    """load_checked over a chunk of paths (one task of massl-shard's worker pool)."""
    return [load_checked(p, max_side, quality) for p in paths]

"""Crash-safe small-file writes (a reader sees the old file or the new one, never half of one)
and file checksums."""
from __future__ import annotations

import hashlib
import json
import os


def fsync_path(path: str) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write `path.partial`, sync it, then rename it over `path`."""
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def sha256_file(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex digest, size in bytes)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file with the mode open() gives a new file (0666 less
    the umask, like the torch.save files beside it): save_file itself creates it 0600, so that
    colleagues could read a checkpoint's pickles but not its safe teacher file."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

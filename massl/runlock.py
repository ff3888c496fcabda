"""One run per run directory: an exclusive lock on `<run.output_dir>/.lock`, held for the run's life.

A second massl-train on the same directory would interleave metrics.jsonl and checkpoints. The
lock is flock(2) on an open file, so the kernel releases it when the holder dies, however it
dies: a crashed run never blocks its restart. The file names the holder (host and pid) for the
refusal message. On a network filesystem flock works where the server supports it (NFSv4 does).
"""
from __future__ import annotations

import fcntl
import os
import socket

from .errors import UserError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # realpath of the directory -> the fd of this process's lock


def acquire_run_lock(output_dir: str) -> str:
    """Take the lock (the directory exists), or raise UserError naming the run that holds it.
    Returns the key for `release_run_lock`."""
    key = os.path.realpath(output_dir)
    release_run_lock(key)  # one train() after another in one process: the earlier one is over
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run.output_dir: {output_dir!r} is in use by another run ({holder}); wait for it to end or "
                        f"stop it, or choose another run.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
    _held[key] = fd
    return key


def release_run_lock(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock

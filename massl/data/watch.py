"""A bound on every blocking read of the input pipeline (data.timeout_s).

A stalled network mount, a `pipe:` command that never writes or a FIFO among the images would
otherwise block a reader forever, with the training process waiting on it. Each read (opening
and reading one image file, each sample of a shard) runs under a real-time timer in the process
that reads it (a loader worker, or the training process without workers): when it fires, the
read is interrupted (EINTR) and DataTimeoutError names what was being read. No torch, no PIL.
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading
from typing import Iterator


class DataTimeoutError(RuntimeError):
    """A read of the input gave nothing within data.timeout_s (not an unreadable image: it is
    neither an OSError nor a ValueError, so no decode or shard handler swallows it)."""


_what: list[str] = [""]


def _on_alarm(signum, frame) -> None:
    raise DataTimeoutError(_what[0])


@contextlib.contextmanager
def reading(what: str, timeout: float) -> Iterator[None]:
    """Raise DataTimeoutError if the body (a read of `what`) takes longer than `timeout` seconds.
    Only in a process's main thread (where signals are delivered); elsewhere, or with timeout 0,
    the body runs unbounded."""
    if timeout <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    _what[0] = (f"data.timeout_s: no data from {what} within {timeout:g} s (a stalled mount, pipe: command or "
                f"FIFO?); fix the input, or raise data.timeout_s for a slow one")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timeout_message(e: BaseException) -> str:
    """The one-line message of a DataTimeoutError, also when a DataLoader re-raised it from a
    worker with the worker's traceback inside the message."""
    found = re.findall(r"data\.timeout_s: no data from .*", str(e))
    return found[-1] if found else str(e)

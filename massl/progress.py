"""Progress of long work: a one-line bar with rate and ETA on stderr (redrawn in place on a
terminal, a plain line every 10 s otherwise, e.g. in a Slurm log), and the duration format of
every ETA massl prints. No torch here: the sharding tool's processes import it."""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, done: int = 0, stream=None, enabled: bool = True):
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.monotonic()
        self.extra = ""

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = format_duration(eta) if eta == eta else "?"
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {pct:5.1f}% "
                f"{rate:.0f} img/s ETA {eta_s} {self.extra}")

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            self._draw()

    def _draw(self) -> None:
        self.stream.write(("\r" + self.line()) if self.tty else self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

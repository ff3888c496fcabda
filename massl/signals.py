"""Stop cleanly on SIGTERM / SIGUSR1 (Slurm preemption, requeue, time limit, `kill`).

The handler only records the signal; the loop polls `agreed()` every few steps, an all-reduce
that makes every rank stop after the same step, then writes a checkpoint and returns.
"""
from __future__ import annotations

import signal
import threading

import torch

from .dist import all_reduce_

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal:
    def __init__(self, device: torch.device, group=None):
        self.device, self.group = device, group
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank once any rank received a stop signal (collective)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        return bool(all_reduce_(flag, self.group, op=torch.distributed.ReduceOp.MAX).item())

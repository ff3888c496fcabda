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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the stop signals are the training process's business.

    Slurm signals every process of a task, and so does `kill` of a process group: the loader
    workers get SIGTERM too. torch's worker handler dies on a SIGTERM that does not come from its
    parent, and the training process then raises "DataLoader worker ... killed by signal" instead
    of checkpointing. Ignored here, the workers end with the loader when the process exits (or
    on their parent's death, or SIGKILL).
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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
        if self.group is None:  # one process: no collective, no device round trip
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=self.device)
        return bool(all_reduce_(flag, self.group, op=torch.distributed.ReduceOp.MAX).item())

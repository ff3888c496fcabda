"""Stop cleanly on SIGTERM / SIGUSR1 (Slurm preemption, requeue, time limit, `kill`).

The handler only records the signal; the loop polls `agreed()` every few steps, an all-reduce
that makes every rank stop after the same step, then writes a checkpoint and returns.
"""
from __future__ import annotations

import os
import signal
import threading

import torch

from .dist import all_reduce_

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: stop signals are the training process's business, unless they
    come from the training process itself.

    Slurm signals every process of a task, and so does `kill` of a process group: the loader
    workers get SIGTERM too. torch's worker handler dies on a SIGTERM that does not come from its
    parent, and the training process then raises "DataLoader worker ... killed by signal" instead
    of checkpointing: such signals are ignored here. A SIGTERM from the parent still ends the
    worker (as torch's handler does): that is how the parent ends its loader, and how
    multiprocessing ends its children when the parent exits, after an error too (ignoring it made
    the exit wait for the workers forever). A signal handler cannot see the sender, so the signals
    are blocked and a thread takes them with `sigwaitinfo`, which can.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask

    def take_signals() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_signals, name="massl-worker-signals", daemon=True).start()


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

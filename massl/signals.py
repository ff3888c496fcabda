"""Stop cleanly on SIGTERM / SIGUSR1 (Slurm preemption, requeue, time limit, `kill`) and on the
first SIGINT (Ctrl-C; a second one exits at once).

The handler only records the signal; the loop polls `agreed()` every few steps, an all-reduce
that makes every rank stop after the same step, then writes a checkpoint and returns. massl-train
then exits with STOPPED_EXIT, which tells a launcher (launch/slurm/train.sbatch) that the run
stopped at a checkpoint and resumes when started again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterable, Iterator, NoReturn

import torch

from .dist import all_reduce_
from .logging import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C, the first one
INTERRUPTED_EXIT = 130  # a second Ctrl-C: at once, no checkpoint (the shell's status for SIGINT)
STOPPED_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped early by a signal, checkpoint written; run again to continue
_early: list[int] = []  # stop signals received before the loop's StopOnSignal was installed


def _exit_on_second_interrupt(signum: int, received) -> None:
    """A second Ctrl-C (after any stop signal) ends the process at once: the user does not want
    to wait for the checkpoint. Checkpoints are written atomically: none is left half-written."""
    if signum == signal.SIGINT and received:
        print("massl: second interrupt: exiting now, without a checkpoint", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED_EXIT)


def _record_early(signum, frame) -> None:
    _exit_on_second_interrupt(signum, _early)
    _early.append(signum)


@contextlib.contextmanager
def stop_signals_recorded():
    """Record stop signals until the loop installs StopOnSignal, which then acts on them: Python's
    default for SIGUSR1 is to die, and start-up (a resume's checkpoint load included) can take
    minutes. The previous handlers come back at the end, unless the body set others (exit_stopped)."""
    previous = {s: signal.signal(s, _record_early) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if signal.getsignal(s) is _record_early:
                signal.signal(s, handler)
        _early.clear()


def exit_stopped() -> NoReturn:
    """Exit with STOPPED_EXIT after a stop at a checkpoint, ignoring SIGTERM from here on: a
    launcher that ends every rank at the first non-zero exit (srun --kill-on-bad-exit) would
    otherwise turn the other ranks' own exit 75 into a death by SIGTERM (status 143)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _mark_stopped()
    # Each rank says so (the launcher may report only the first status, or none): with
    # run.log_all_ranks, every rank's line shows that it stopped cleanly.
    log.info(f"massl: exiting with status {STOPPED_EXIT} (stopped at a checkpoint; run the same command again "
             f"to continue)")
    sys.exit(STOPPED_EXIT)


def _mark_stopped() -> None:
    """Leave an empty file named after this process in the folder MASSL_STOP_MARKS names, if any.

    launch/torchrun.sh counts them: torchrun reports a rank's exit 75 as a failure (status 1), and
    the script ends with 75 only when every rank it started stopped at the checkpoint. Without the
    file the script keeps the launcher's status: a failure stays a failure."""
    marks = os.environ.get("MASSL_STOP_MARKS")
    if marks:
        try:
            with open(os.path.join(marks, str(os.getpid())), "w"):
                pass
        except OSError as e:
            log.warning(f"massl: MASSL_STOP_MARKS={marks}: {e}; the launch script will report a failure")


def die_with_parent(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when the thread that started it exits
    (prctl PR_SET_PDEATHSIG); False where that is not available. A parent already gone by now
    (the race before the call) counts as gone: the signal is raised at once."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signum), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


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
    sys.excepthook = _quiet_abandoned_fetch(sys.excepthook)
    die_with_parent(signal.SIGKILL)  # a worker blocked in a read never sees its parent go: no orphan
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask

    def take_signals() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_signals, name="massl-worker-signals", daemon=True).start()


def _quiet_abandoned_fetch(hook):
    """`hook`, silent on a connection error in multiprocessing's resource-sharer thread.

    A worker hands a batch's tensors to the training process as file descriptors, which the
    training process fetches over a connection to that thread. A stop signal that ends the wait
    for data (StopWhileWaiting) may land in the middle of such a fetch: the training process
    drops the connection and the batch (it checkpoints its last complete step, and a resume
    reads that batch again), and the thread would print the peer's hang-up as a traceback into
    the run's log. Every other error still reaches `hook`."""
    def excepthook(kind, value, tb) -> None:
        code = tb.tb_frame.f_code if tb is not None else None
        if (issubclass(kind, (OSError, EOFError)) and code is not None and code.co_name == "_serve"
                and os.path.basename(code.co_filename) == "resource_sharer.py"):
            return
        hook(kind, value, tb)
    return excepthook


class StopWhileWaiting(Exception):
    """Raised by the stop-signal handler into a wait for data (one process): a read that may
    never return must not keep the run from checkpointing and exiting."""


class StopOnSignal:
    def __init__(self, device: torch.device, group=None):
        self.device, self.group = device, group
        self.received: int | None = None
        self.interrupted = False  # a stop signal ended a wait for data
        self._waiting = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        _exit_on_second_interrupt(signum, self.received is not None)
        self.received = signum
        if self._waiting and self.group is None:
            raise StopWhileWaiting()

    def waiting(self, batches: Iterable) -> Iterator:
        """`batches`, with a stop signal honoured while waiting for the next one: in one process
        the wait ends at once (`interrupted`, the loop checkpoints its last complete step); with
        several ranks, which must stop after the same step, the wait ends at data.timeout_s."""
        it = iter(batches)
        while True:
            self._waiting = True
            try:
                batch = next(it)
            except StopIteration:
                return
            except StopWhileWaiting:
                self.interrupted = True
                return
            finally:
                self._waiting = False
            yield batch

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            if _early:
                self.received = _early[-1]
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

"""The multi-process test harness: its rendezvous port can be taken by nobody else."""
import multiprocessing
import socket

import torch.multiprocessing

from massl.testing import free_port, run_local_ranks
from massl.testing.ports import _ephemeral_ports


def _rank_and_world(rank, world):
    return rank, world


class _ThievingProcess(multiprocessing.get_context("spawn").Process):
    """A rank process that, just before it starts, lets a thief bind its rendezvous port (if it can)."""
    thieves: list = []
    stolen: list = []

    def start(self):
        port = self._args[3]  # run_local_ranks's arguments to each rank: (fn, rank, world, port, ...)
        thief = socket.socket()
        try:
            thief.bind(("127.0.0.1", port))
            thief.listen()
            self.stolen.append(port)
        except OSError:
            pass
        self.thieves.append(thief)
        return super().start()


class _Context:
    def __init__(self, ctx):
        self._ctx = ctx
        self.Process = _ThievingProcess

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def test_a_process_that_grabs_the_port_before_the_ranks_start_cannot_break_the_rendezvous(monkeypatch):
    """Another process (a neighbouring test's connection) binding the rendezvous port between its
    choice and rank 0's start would fail the run with EADDRINUSE. Here a thief tries exactly
    then; the harness must hold the port already."""
    _ThievingProcess.thieves.clear()
    _ThievingProcess.stolen.clear()
    real_get_context = torch.multiprocessing.get_context
    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda method: _Context(real_get_context(method)))
    try:
        assert run_local_ranks(_rank_and_world, 2) == [(0, 2), (1, 2)]
    finally:
        for thief in _ThievingProcess.thieves:
            thief.close()
    assert len(_ThievingProcess.thieves) == 2 and _ThievingProcess.stolen == []


def test_free_port_is_outside_the_kernels_ephemeral_range_and_bindable():
    low, high = _ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

"""Harnesses for the tests and benchmarks, not used by training: local multi-process runs
(local_ranks.py), rendezvous ports (ports.py) and counting a step's dispatched ops and host syncs (opcount.py)."""
from .local_ranks import run_local_ranks
from .ports import free_port

__all__ = ["free_port", "run_local_ranks"]

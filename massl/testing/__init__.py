"""Harnesses for the tests and benchmarks, not used by training: local multi-process runs
(local_ranks.py) and counting a step's dispatched ops and host syncs (opcount.py)."""
from .local_ranks import free_port, run_local_ranks

__all__ = ["free_port", "run_local_ranks"]

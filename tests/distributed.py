"""Run a function on W real processes with the gloo backend (CPU), collecting each rank's result.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) at module level

Each rank has a process group initialised (dist.group.WORLD), one intra-op thread, and returns
a picklable value (CPU tensors are fine). A failure in any rank raises with its traceback.
The implementation is massl.testing.run_local_ranks, shared with the benchmarks.
"""
from massl.testing import free_port, run_local_ranks as run_ranks

__all__ = ["free_port", "run_ranks"]

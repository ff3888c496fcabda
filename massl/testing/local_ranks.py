"""Run a function on W fresh processes of this machine, each with a process group: the harness of
the multi-process tests and benchmarks (training itself starts its ranks with a launcher).

    results = run_local_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) at module level
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def _local_rank_entry(fn, rank, world, port, backend, queue, args, env):
    import pickle
    import traceback

    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        # A client of the parent's store: the parent bound its port before starting us, so no other
        # process can take it in between (a port found free and bound later can be).
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        # Pickled here: tensors put on the queue as-is travel as shared memory that dies with this process.
        result = pickle.dumps(fn(rank, world, *args))
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0,
                    env: Optional[dict] = None) -> list:
    """Run `fn(rank, world_size, *args)` (a module-level function) on `world_size` fresh processes
    of this machine, each with the default process group initialised (`backend`) and one intra-op
    thread; returns each rank's (picklable) result in rank order. A failure in any rank raises
    with its traceback. For tests and benchmarks; training uses a launcher."""
    import pickle

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # The store lives here until every rank has finished: its port is held from before any rank starts.
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_local_rank_entry, args=(fn, r, world_size, port, backend, queue, args, env or {}))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
        del store
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]

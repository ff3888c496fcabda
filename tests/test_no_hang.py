"""A process never outlives its error: an error in a data loader (worker or
not) ends every rank with a non-zero exit within seconds, leaving no process behind.

The runs are real `python -m massl.cli` processes, started as srun starts tasks (RANK and
WORLD_SIZE in the environment, no torchrun), each in its own session so the test can see
whether any of its processes (DataLoader workers included) is left. Before the fix, the
loader workers ignored the SIGTERM with which multiprocessing ends them at exit, and the
failing process waited for them forever.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_overrides
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_WITHIN_S = 30  # after the first error message
START_DEADLINE_S = 120  # for the error to appear at all (a loaded 2-core machine starts torch slowly)


def folder_with_a_bad_run(root: str) -> str:
    """32 readable images, then 16 unreadable ones: the sample that lands on the first bad file
    cannot be replaced (16 consecutive failures) and the loader raises."""
    os.makedirs(root)
    rng = np.random.RandomState(0)
    for i in range(32):
        Image.fromarray(rng.randint(0, 256, (20, 20, 3), dtype=np.uint8)).save(os.path.join(root, f"a{i:02d}.png"))
    for i in range(16):
        with open(os.path.join(root, f"b{i:02d}.jpg"), "w") as f:
            f.write("not an image")
    return root


def webdataset_with_no_usable_shard(root: str) -> list[str]:
    """A manifest promising 48 samples in a shard that is not a tar: "no shard delivered any sample"."""
    import json

    os.makedirs(root)
    with open(os.path.join(root, "s-000000.tar"), "wb") as f:
        f.write(b"\0garbage" * 100)
    manifest = {"format": "massl-shards", "version": 1, "shards": [
        {"name": "s-000000.tar", "samples": 48, "bytes": 800, "sha256": "0" * 64}]}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return ["data.path=", "data.source=webdataset", f"data.urls={root}"]


def group_alive(proc: subprocess.Popen) -> bool:
    """Is any process of `proc`'s session still there (the leader reaped first: a zombie counts)?"""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def logs_with_error(logs: list[str]) -> bool:
    return any("Error" in open(p).read() for p in logs if os.path.exists(p))


@pytest.mark.parametrize("world,workers,source", [(1, 0, "folder"), (1, 1, "folder"), (2, 0, "folder"),
                                                  (2, 1, "folder"), (1, 1, "webdataset")])
def test_a_loader_error_ends_every_rank(tmp_path, world, workers, source):
    if source == "folder":
        data = [f"data.path={folder_with_a_bad_run(str(tmp_path / 'images'))}"]
    else:
        data = webdataset_with_no_usable_shard(str(tmp_path / "shards"))
    args = [sys.executable, "-m", "massl.cli"] + tiny_overrides("unused", str(tmp_path / "run")) + data + [
        f"data.num_workers={workers}", "optim.epochs=20", "engine.name=" + ("ddp" if world > 1 else "single")]
    env = {**os.environ, "PYTHONPATH": ROOT, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    logs = [str(tmp_path / f"rank{r}.log") for r in range(world)]
    procs = []
    try:
        for r in range(world):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + START_DEADLINE_S
        while not logs_with_error(logs) and time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        assert logs_with_error(logs), [open(p).read() for p in logs]
        deadline = time.monotonic() + EXIT_WITHIN_S
        while time.monotonic() < deadline and any(group_alive(p) for p in procs):
            time.sleep(0.2)
        left = [p.pid for p in procs if group_alive(p)]
        assert not left, f"processes left {EXIT_WITHIN_S} s after the error:\n" + "\n".join(open(p).read() for p in logs)
        assert all(p.returncode not in (0, None) for p in procs), [p.returncode for p in procs]
    finally:
        for p in procs:
            if group_alive(p):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

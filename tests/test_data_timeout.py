"""No read blocks forever: a read that gives nothing within data.timeout_s ends the run with one
line naming the file or url; a stop signal is honoured while waiting for data (one process)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from massl.config import load_config
from massl.data.folder import MultiCropFolder
from massl.data.multicrop import MultiCropAugmentation
from massl.data.watch import DataTimeoutError
from massl.errors import UserError
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(digit_shards):
    return digit_shards


def stalling_urls(shards: str, tmp_path, stall: bool) -> list[str]:
    """A pipe: command per shard that stalls as a hung network read does: always (stall), or
    once the file `stall` exists beside it."""
    script = tmp_path / "serve.sh"
    marker = tmp_path / "stall"
    if stall:
        marker.write_text("")
    script.write_text(f'if [ -e {marker} ]; then exec sleep 120; fi\nexec cat {shards}/$1\n')
    names = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))
    urls = "::".join(f"pipe:sh {script} {n}" for n in names)
    return ["data.path=", "data.source=webdataset", f"data.urls={urls}", f"data.manifest={shards}/manifest.json"]


def test_a_file_that_blocks_is_a_timeout_naming_it(digits_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), str(tmp_path / "run")))
    folder = MultiCropFolder(cfg.data.path, MultiCropAugmentation(cfg.data), seed=0)
    fifo = str(tmp_path / "stalled.jpg")
    os.mkfifo(fifo)  # replaced after the listing, as a file on a stalled mount
    folder.paths[0], folder.timeout = fifo, 1.0
    start = time.monotonic()
    with pytest.raises(DataTimeoutError, match=r"^data.timeout_s: no data from .*stalled.jpg within 1 s"):
        folder[(0, 0)]  # before: blocked forever in open()
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stalled_pipe_ends_training_with_one_line(shards, tmp_path, workers):
    from massl.train import train

    cfg = load_config(None, tiny_overrides("unused", str(tmp_path / "run")) + stalling_urls(shards, tmp_path, True)
                      + [f"data.num_workers={workers}", "data.timeout_s=2", "run.max_steps=3"])
    with pytest.raises(UserError) as err:
        train(cfg)  # before: blocked until the command ended (here 30 s; a hung mount: forever)
    msg = str(err.value)
    assert msg.startswith("data.timeout_s: no data from pipe:sh ") and "within 2 s" in msg, msg
    assert "the last checkpoint in" in msg and "\n" not in msg


@pytest.mark.slow
def test_a_stop_signal_while_waiting_for_data_checkpoints_and_exits_75(shards, tmp_path):
    run = str(tmp_path / "run")
    args = [sys.executable, "-m", "massl.cli"] + tiny_overrides("unused", run) + stalling_urls(shards, tmp_path, False) + [
        "optim.epochs=20"]  # data.timeout_s at its default (600 s)
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "step 2" not in log.read_text() and proc.poll() is None:
            time.sleep(0.2)
        assert "step 2" in log.read_text(), log.read_text()
        (tmp_path / "stall").write_text("")  # the next shard opened stalls
        size, still = -1, 0
        while still < 15 and time.monotonic() < deadline + 60:  # no new line for 3 s: waiting for data
            time.sleep(0.2)
            still, size = (still + 1, size) if log.stat().st_size == size else (0, log.stat().st_size)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # before: waited for the stalled read (here 30 s, a hung mount: forever)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the test's own stalled commands, and anything left
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    assert rc == 75, text
    assert "stop signal received while waiting for data" in text
    steps = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert steps and steps[-1].startswith("step_"), steps

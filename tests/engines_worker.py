"""A training process for the kill tests, launched by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.engines_worker CONFIG HOLD_STEP MARKERS

trains as `massl.train.train` does. Each rank writes its process id to MARKERS/pid.<rank> (torchrun
starts the ranks in their own sessions: the test kills them by id). With HOLD_STEP > 0, each rank
stops inside the checkpoint write of that step (its files written, the checkpoint not yet
sealed), drops MARKERS/held.<rank> and waits there to be killed.
"""
from __future__ import annotations

import os
import sys
import time

from massl.config import load_config
from massl.engines import engine_class
from massl.train import train


def hold_inside_checkpoint_write(engine_class, step: int, markers: str) -> None:
    write = engine_class.save

    def write_then_hold(self, directory):
        write(self, directory)  # <run>/checkpoints/.tmp-step_<N>/engine
        if os.path.basename(os.path.dirname(directory)) == f".tmp-step_{step:09d}":
            open(os.path.join(markers, f"held.{self.env.rank}"), "w").close()
            time.sleep(600)

    engine_class.save = write_then_hold


if __name__ == "__main__":
    config, hold_step, markers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(os.path.join(markers, f"pid.{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    cfg = load_config(config)
    if hold_step > 0:
        hold_inside_checkpoint_write(engine_class(cfg.engine.name), hold_step, markers)
    train(cfg)

"""Diagnostics and run metrics.

Every message of massl goes through one logger, `logging.getLogger("massl")` (`log` here):
information on stdout from the main rank, warnings and errors on stderr from every rank
(prefixed with the rank, then the level: `warning: ...`); `run.log_all_ranks` shows every
rank's information too. The run's metrics go to a progress line (through the same logger),
TensorBoard and metrics.jsonl, from the main rank only. No torch at import: the sharding tool uses the same logger.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time

from .progress import format_duration

log = logging.getLogger("massl")


class _StdHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at the time of the message (redirections,
    test captures), not to the stream of the time the handler was made."""

    def __init__(self, name: str):
        self._std = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._std)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LevelFormatter(logging.Formatter):
    """Warnings and errors carry their level, as the commands' one-line `error: ...`:
    `warning: <message>` (after the rank prefix); nobody types the prefix by hand."""

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(rank: int = 0, all_ranks: bool = False, quiet: bool = False) -> None:
    """Configure the massl logger for this process (idempotent: replaces its own handlers).
    `quiet`: warnings and errors only."""
    # Other ranks' lines name their host too: on several nodes, where a warning came from.
    prefix = "" if rank == 0 else f"[rank {rank} on {socket.gethostname()}] "
    info = _StdHandler("stdout")
    info.addFilter(_Below(logging.WARNING))
    problems = _StdHandler("stderr")
    problems.setLevel(logging.WARNING)
    info.setFormatter(logging.Formatter(prefix + "%(message)s"))
    problems.setFormatter(_LevelFormatter(prefix + "%(level)s: %(message)s"))
    log.handlers = [info, problems]
    log.setLevel(logging.INFO if (rank == 0 or all_ranks) and not quiet else logging.WARNING)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        import torch


        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """`flops_per_image` (massl.flops) and `peak_flops` (FLOP/s of all the run's devices together,
    None when unknown) give each record its model FLOPs utilisation, `mfu`."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, total_steps: int, start_step: int,
                 flops_per_image: float = 0.0, peak_flops: float | None = None):
        self.enabled, self.total_steps = enabled, total_steps
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.writer = None
        self.jsonl = None
        self.t0, self.step0 = time.perf_counter(), start_step
        if not enabled:
            return
        # Appended to on a resume: records after the resumed step were moved aside (checkpoint/resume.py).
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events a crashed run logged after the resumed step
            self.writer = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, epoch: int, metrics: dict, images_per_step: int) -> None:
        """`metrics`: plain floats. Adds throughput and ETA from the wall time since the last call."""
        now = time.perf_counter()
        steps = max(step - self.step0, 1)
        sec_per_step = (now - self.t0) / steps
        self.t0, self.step0 = now, step
        metrics = {**metrics, "img_per_s": images_per_step / sec_per_step, "sec_per_step": sec_per_step,
                   "eta_s": sec_per_step * (self.total_steps - step)}
        if self.peak_flops:
            metrics["mfu"] = self.flops_per_image * metrics["img_per_s"] / self.peak_flops
        if not self.enabled:
            return
        line = (f"step {step}/{self.total_steps} ep {epoch} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                f"wd {metrics['wd']:.3g} t_temp {metrics['teacher_temp']:.4f} t_mom {metrics['teacher_momentum']:.5f} "
                f"agree {metrics.get('agree_top1', float('nan')):.3f}/{metrics.get('agree_top5', float('nan')):.3f} "
                f"| {metrics['img_per_s']:.1f} img/s eta {format_duration(metrics['eta_s'])} "
                f"mem {metrics['peak_mem_gib']:.2f} GiB")
        if "mfu" in metrics:
            line += f" mfu {metrics['mfu']:.3f}"
        if metrics.get("skipped_images"):
            line += f" skipped {int(metrics['skipped_images'])}"
        log.info(line)
        assert self.jsonl is not None  # opened whenever enabled
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()  # a SIGKILL loses at most the record being written

    def log_eval(self, step: int, epoch: int, metrics: dict, seconds: float) -> None:
        """Evaluation metrics (plain floats; {} on ranks other than the main one): a line, a
        metrics.jsonl record with keys `eval/<name>`, TensorBoard scalars `eval/<name>`. The
        evaluation's `seconds` are left out of the next training throughput."""
        self.t0 += seconds
        if not self.enabled:
            return
        metrics = {f"eval/{k}": v for k, v in {**metrics, "seconds": seconds}.items()}
        log.info(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()))
        assert self.jsonl is not None  # opened whenever enabled
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()

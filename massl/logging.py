"""Run metrics: a progress line on stdout, TensorBoard scalars and metrics.jsonl (main rank only)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, total_steps: int, start_step: int):
        self.enabled, self.total_steps = enabled, total_steps
        self.writer = None
        self.jsonl = None
        self.t0, self.step0 = time.perf_counter(), start_step
        if not enabled:
            return
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, step: int, epoch: int, metrics: dict, images_per_step: int) -> None:
        """`metrics`: plain floats. Adds throughput and ETA from the wall time since the last call."""
        now = time.perf_counter()
        steps = max(step - self.step0, 1)
        sec_per_step = (now - self.t0) / steps
        self.t0, self.step0 = now, step
        metrics = {**metrics, "img_per_s": images_per_step / sec_per_step, "sec_per_step": sec_per_step,
                   "eta_s": sec_per_step * (self.total_steps - step)}
        if not self.enabled:
            return
        line = (f"step {step}/{self.total_steps} ep {epoch} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                f"wd {metrics['wd']:.3g} t_temp {metrics['teacher_temp']:.4f} mom {metrics['momentum']:.5f} "
                f"agree {metrics.get('agree_top1', float('nan')):.3f}/{metrics.get('agree_top5', float('nan')):.3f} "
                f"| {metrics['img_per_s']:.1f} img/s eta {format_duration(metrics['eta_s'])} "
                f"mem {metrics['peak_mem_gib']:.2f} GiB")
        if metrics.get("skipped_images"):
            line += f" skipped {int(metrics['skipped_images'])}"
        print(line, flush=True)
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr if text.startswith("warning") else sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()

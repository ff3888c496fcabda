"""Model FLOPs of a training step, the device's peak rate, and model FLOPs utilisation (MFU).

`step_flops_per_image(cfg)` counts, once at the start of a run, the FLOPs of one step with
`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and attention,
forward and backward): the student on all crops with its backward, the teacher on the global
crops, the memory-bank loss with its backward. It runs on the meta device: nothing is computed
or allocated, the run's RNG, optimiser state and memory are untouched. It counts model FLOPs:
without activation checkpointing's recomputation or the loss's chunked recomputation, so that
MFU compares settings by useful work. Per rank and image: with the memory sharded each rank
multiplies all `G` rows by its `K/W` slots, the same `B * K` products per rank as one process
with the whole memory (docs/memory.md), so a one-process count at the per-rank batch is each
rank's count.

MFU = FLOPs per image x images per second / (ranks x peak FLOP/s per device), the peak being
`run.peak_tflops` when set, else the dense bf16 tensor-core rate of the device named in
`PEAK_TFLOPS` (the datasheet rate, whatever `run.precision`), else unknown (no MFU: the CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .dist import DistEnv
from .models import build_student_teacher
from .objective import MaSSLObjective

# Dense bf16 tensor-core rates (TFLOP/s per device, vendor datasheets, without sparsity), matched
# in this order against torch.cuda.get_device_name(): the first name contained in it wins.
PEAK_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.0),  # also GH200
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> Optional[float]:
    """FLOP/s of one device: `peak_tflops` (run.peak_tflops) if > 0, else the table's entry for
    this CUDA device's name, else None (CPU, unknown device)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def step_flops_per_image(cfg: Config) -> float:
    """Model FLOPs of one training step per image of a rank's batch (module docstring): the run's
    models and objective (massl/objective.py) built on the meta device, in one process."""
    d = cfg.data
    batch = d.batch_size
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.local_crops_number
    meta = torch.device("meta")
    with torch.random.fork_rng(devices=[]), meta:
        student, teacher = build_student_teacher(cfg)
        objective = MaSSLObjective.from_config(cfg, DistEnv(device=meta))
        crops = [torch.empty(batch, 3, s, s) for s in sizes]
        with FlopCounterMode(display=False) as counter:
            zs = student(crops)
            with torch.no_grad():
                zt = teacher(crops[:2])
            # The permutation changes which slots meet, not the FLOPs; a random one needs a real device.
            terms = objective.terms(zs, zt, torch.arange(cfg.memory.size), cfg.loss.teacher_temp)
            terms.objective.backward()
    return counter.get_total_flops() / batch

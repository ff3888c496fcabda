"""Time one MaSSL training step per setting: images/s and peak memory, by engine and activation checkpointing.

Synthetic crops already on the device (no data loading), the published shapes: 2 global crops at
224 px and 10 local crops at 96 px per image, memory K=131072 x 256 with partitions of 16384,
AdamW, per-parameter clipping, teacher EMA, the memory enqueue: the training loop's step without
its logging. Engines run in this one process (fsdp at world size 1). Each row is compared with a
reference measured in the same run: the first setting of the same architecture (by default
`single` without activation checkpointing).

    python benchmarks/bench_step.py                        # GPU: ViT-S/16 and ViT-B/16, single/fsdp, AC none/full
    python benchmarks/bench_step.py --archs vit_base --batch 128 --ac full
    python benchmarks/bench_step.py --engines fsdp deepspeed --zero-stage 2 3   # DeepSpeed ZeRO-2 and ZeRO-3 rows
    python benchmarks/bench_step.py --tiny                 # seconds on a CPU: a smoke test of this script
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from massl.config import Config  # noqa: E402
from massl.dist import DistEnv  # noqa: E402
from massl.engines import build_engine  # noqa: E402
from massl.logging import peak_memory_gib  # noqa: E402
from massl.memory import MemoryBank  # noqa: E402
from massl.models import build_student_teacher  # noqa: E402
from massl.train import train_step  # noqa: E402

HPARAMS = {"lr": 1e-4, "wd": 0.04, "teacher_momentum": 0.996, "teacher_temp": 0.07}  # fixed: no schedules here


def make_config(args, arch: str, engine: str, ac: str) -> Config:
    """`engine`: an engine name, or `deepspeed-zero<stage>`."""
    cfg = Config()
    cfg.run.precision = args.precision
    if engine.startswith("deepspeed-zero"):
        engine, cfg.engine.zero_stage = "deepspeed", int(engine[len("deepspeed-zero"):])
    cfg.engine.name, cfg.engine.activation_checkpointing, cfg.engine.compile = engine, ac, args.compile
    cfg.model.arch, cfg.model.patch_size = arch, args.patch
    if args.tiny:
        cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
        cfg.model.head_hidden_dim, cfg.model.head_bottleneck_dim = 64, 32
    cfg.memory.size, cfg.memory.partition_size, cfg.memory.chunk_rows = args.memory_size, args.partition_size, args.chunk_rows
    cfg.data.batch_size, cfg.data.global_crop_size, cfg.data.local_crop_size = args.batch, args.global_size, args.local_size
    cfg.data.local_crops_number = args.local_crops
    return cfg


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device: torch.device, arch: str, engine_name: str, ac: str) -> dict:
    cfg = make_config(args, arch, engine_name, ac)
    row = {"arch": arch, "engine": engine_name, "activation_checkpointing": ac, "batch": args.batch}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        torch.manual_seed(0)
        student, teacher = build_student_teacher(cfg)
        engine = build_engine(cfg, DistEnv(device=device), student, teacher)
        memory = MemoryBank(cfg.model.head_bottleneck_dim, cfg.memory.size, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
        crops = [torch.randn(args.batch, 3, s, s, device=device, generator=g) for s in sizes]
        for step in range(args.warmup):
            train_step(engine, memory, crops, cfg, step, HPARAMS)
        synchronize(device)
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            loss = train_step(engine, memory, crops, cfg, step, HPARAMS)["loss"]
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        row.update(precision=engine.precision, step_ms=1000 * seconds, img_per_s=args.batch / seconds,
                   peak_gib=peak_memory_gib(device), loss=float(loss))
    except torch.cuda.OutOfMemoryError:
        row.update(error="out of memory")
    finally:
        engine = memory = crops = student = teacher = None
    return row


def add_ratios(rows: list[dict]) -> None:
    """img/s and peak memory relative to the first successful row of the same architecture."""
    refs: dict = {}
    for row in rows:
        if "error" in row:
            continue
        ref = refs.setdefault(row["arch"], row)
        row["speed_vs_ref"] = row["img_per_s"] / ref["img_per_s"]
        row["memory_vs_ref"] = row["peak_gib"] / ref["peak_gib"]
        row["reference"] = f"{ref['engine']}/{ref['activation_checkpointing']}"


def table(rows: list[dict]) -> str:
    lines = ["| arch | engine | AC | batch | img/s | step ms | peak GiB | speed vs ref | memory vs ref |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['engine']} | {r['activation_checkpointing']} | {r['batch']} | "
                         f"{r['error']} | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['engine']} | {r['activation_checkpointing']} | {r['batch']} | "
                     f"{r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | "
                     f"{r['speed_vs_ref']:.2f} | {r['memory_vs_ref']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"])
    p.add_argument("--engines", nargs="+", default=["single", "fsdp"], choices=["single", "fsdp", "deepspeed"])
    p.add_argument("--zero-stage", nargs="+", type=int, default=[2], choices=[1, 2, 3],
                   help="with --engines deepspeed: a row per ZeRO stage (default 2)")
    p.add_argument("--ac", nargs="+", default=["none", "full"], choices=["none", "full", "every_k"])
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--memory-size", type=int, default=131072)
    p.add_argument("--partition-size", type=int, default=16384)
    p.add_argument("--chunk-rows", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setting")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench_step.json", help="JSON results (default bench_step.json)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny custom ViT, 2x32 + 2x16 px crops, K=256, batch 4, 2 steps, CPU fp32")
    args = p.parse_args(argv)
    if args.tiny:
        args.archs, args.patch, args.global_size, args.local_size, args.local_crops = ["custom"], 8, 32, 16, 2
        args.memory_size, args.partition_size, args.batch, args.steps, args.warmup = 256, 64, 4, 2, 1
        args.device, args.precision = "cpu", "fp32"
    return args


def settings(args) -> list[str]:
    """The engines to time, deepspeed expanded into `deepspeed-zero<stage>` per --zero-stage."""
    return [e for name in args.engines
            for e in ([f"deepspeed-zero{s}" for s in args.zero_stage] if name == "deepspeed" else [name])]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    rows = [measure(args, device, arch, engine, ac) for arch, engine, ac in itertools.product(args.archs, settings(args), args.ac)]
    add_ratios(rows)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
              "memory_size": args.memory_size, "partition_size": args.partition_size, "compile": args.compile,
              "rows": rows}
    print(f"{result['device']}, torch {result['torch']}, crops {result['crops']}, K={args.memory_size}, "
          f"P={args.partition_size}")
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""Time one MaSSL training step per setting (images/s, peak memory, MFU), or count its aten ops.

Synthetic crops already on the device (no data loading), the published shapes: 2 global crops at
224 px and 10 local crops at 96 px per image, memory K=131072 x 256 with partitions of 16384,
AdamW, per-parameter clipping, teacher EMA, the memory enqueue: the training loop's step without
its logging. Engines run in this one process (ddp and fsdp at world size 1). Each row is compared
with a reference measured in the same run: the first setting of the same architecture (by default
`single` without activation checkpointing).

    python benchmarks/bench_step.py                        # GPU: ViT-S/16 and ViT-B/16, single/fsdp, AC none/full
    python benchmarks/bench_step.py --archs vit_base --batch 128 --ac full --compile off on
    python benchmarks/bench_step.py --engines fsdp deepspeed --zero-stage 2 3   # DeepSpeed ZeRO-2 and ZeRO-3 rows
    python benchmarks/bench_step.py --tiny                 # seconds on a CPU: a smoke test of this script

`--count-ops` counts instead the aten operators one step dispatches (massl.testing.opcount: the
CPU-measurable proxy for kernel launches) and its host syncs, per engine, by default at the
shapes of the published step's count (ViT-S/16, batch 8, 2x64 + 10x32 px, K=131072, P=16384, fp32
on the CPU), and runs the published code's op counter (`--published-ops-script`, default
`.ref/count_published_ops.py`: a script beside the published MaSSL code, not part of massl; a
reference measured in the same run, never imported) at the same shapes for the ratio:

    python benchmarks/bench_step.py --count-ops --out ops.json [--published-ops-script PATH]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from massl.config import Config  # noqa: E402
from massl.dist import DistEnv  # noqa: E402
from massl.engines import ENGINES  # noqa: E402
from massl.flops import peak_flops, step_flops_per_image  # noqa: E402
from massl.logging import peak_memory_gib  # noqa: E402
from massl.testing.opcount import OpCounter  # noqa: E402
from massl.schedules import Hyper  # noqa: E402
from massl.train import build_step, train_step  # noqa: E402

HPARAMS = Hyper(lr=1e-4, wd=0.04, teacher_momentum=0.996, teacher_temp=0.07)  # fixed: no schedules here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_OPS_SCRIPT = os.path.join(ROOT, ".ref", "count_published_ops.py")
FLOPS_PER_IMAGE: dict = {}  # arch -> model FLOPs per image of one step (massl.flops), counted once


def make_config(args, arch: str, engine: str, ac: str, compile: bool = False) -> Config:
    """`engine`: an engine name, or `deepspeed-zero<stage>`."""
    cfg = Config()
    cfg.run.precision = args.precision
    if engine.startswith("deepspeed-zero"):
        engine, cfg.engine.zero_stage = "deepspeed", int(engine[len("deepspeed-zero"):])
    cfg.engine.name, cfg.engine.activation_checkpointing, cfg.engine.compile = engine, ac, compile
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


def synthetic_step(cfg: Config, device: torch.device):
    """The engine, objective and synthetic crops of one process's step (`train_step(*built, step, HPARAMS)`),
    built as a run builds them."""
    engine, objective = build_step(cfg, DistEnv(device=device))
    g = torch.Generator(device=device).manual_seed(0)
    sizes = [cfg.data.global_crop_size] * 2 + [cfg.data.local_crop_size] * cfg.data.local_crops_number
    crops = [torch.randn(cfg.data.batch_size, 3, s, s, device=device, generator=g) for s in sizes]
    return engine, objective, crops


def measure(args, device: torch.device, arch: str, engine_name: str, ac: str, compile: bool) -> dict:
    """One timing row: warm-up steps, then the timed ones (the mean)."""
    cfg = make_config(args, arch, engine_name, ac, compile)
    row = {"arch": arch, "engine": engine_name, "activation_checkpointing": ac, "compile": compile, "batch": args.batch}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    built = None
    try:
        built = synthetic_step(cfg, device)
        for step in range(args.warmup):
            train_step(*built, step, HPARAMS)
        synchronize(device)
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            loss = train_step(*built, step, HPARAMS)["loss"]
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        if arch not in FLOPS_PER_IMAGE:  # the same for every engine, AC and compile setting
            FLOPS_PER_IMAGE[arch] = step_flops_per_image(cfg)
        flops, peak = FLOPS_PER_IMAGE[arch], peak_flops(device, args.peak_tflops)
        row.update(precision=built[0].precision, step_ms=1000 * seconds, img_per_s=args.batch / seconds,
                   peak_gib=peak_memory_gib(device), loss=float(loss), tflop_per_image=flops / 1e12,
                   mfu=flops * args.batch / seconds / peak if peak else None)
    except torch.cuda.OutOfMemoryError:
        row.update(error="out of memory")
    except Exception as e:  # one failing setting (a compile error, say) must not lose the others' rows
        row.update(error=f"{type(e).__name__}: {e}"[:300])
    finally:
        built = None
    return row


def count_ops(args, device: torch.device, engine_name: str) -> dict:
    """Aten ops and host syncs of one step (after a warm-up step that creates the optimiser state)."""
    cfg = make_config(args, args.archs[0], engine_name, args.ac[0])
    row = {"engine": engine_name}
    try:
        built = synthetic_step(cfg, device)
        train_step(*built, 0, HPARAMS)
        with OpCounter() as counter:
            train_step(*built, 1, HPARAMS)
        row.update(counter.summary())
    except Exception as e:  # an engine that cannot run here (a missing package) gives an error row
        row.update(error=f"{type(e).__name__}: {e}"[:300])
    return row


def count_published_ops(args) -> dict:
    """The published step's count at the same shapes, by its own script in a subprocess (reference only)."""
    row = {"engine": "published", "reference": True}
    script = args.published_ops_script
    if not os.path.isfile(script):
        return {**row, "error": f"{script} not found (--published-ops-script)"}
    cmd = [sys.executable, script, "--arch", args.archs[0], "--batch", str(args.batch), "--global-size",
           str(args.global_size), "--local-size", str(args.local_size), "--local-crops", str(args.local_crops),
           "--out-dim", str(args.memory_size), "--partition-size", str(args.partition_size)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "total_ops": result["total_ops"], "host_scalar_reads": result["host_scalar_reads"],
            "top": result["top"]}


def ops_table(rows: list[dict]) -> str:
    published = next((r for r in rows if r.get("reference") and "error" not in r), None)
    lines = ["| engine | aten ops/step | non-view ops | host-scalar reads | data-dependent shapes | ops vs published |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['error']} | | | | |")
            continue
        ratio = f"{r['total_ops'] / published['total_ops']:.2f}" if published else "-"
        lines.append(f"| {r['engine']} | {r['total_ops']} | {r.get('non_view_ops', '-')} | {r['host_scalar_reads']} | "
                     f"{r.get('dynamic_shape_ops', '-')} | {ratio} |")
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    """img/s and peak memory relative to the first successful row of the same architecture."""
    refs: dict = {}
    for row in rows:
        if "error" in row:
            continue
        ref = refs.setdefault(row["arch"], row)
        row["speed_vs_ref"] = row["img_per_s"] / ref["img_per_s"]
        row["memory_vs_ref"] = row["peak_gib"] / ref["peak_gib"]
        row["reference"] = f"{ref['engine']}/{ref['activation_checkpointing']}/compile={ref['compile']}"


def table(rows: list[dict]) -> str:
    lines = ["| arch | engine | AC | compile | batch | img/s | step ms | peak GiB | MFU | speed vs ref | memory vs ref |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        setting = f"| {r['arch']} | {r['engine']} | {r['activation_checkpointing']} | {r['compile']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{setting} {r['error']} | | | | | |")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        lines.append(f"{setting} {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {mfu} | "
                     f"{r['speed_vs_ref']:.2f} | {r['memory_vs_ref']:.2f} |")
    return "\n".join(lines)


# Settings whose default depends on the mode: timing on the device, or --count-ops on the CPU
# at the shapes of the published step's op count.
MODE_DEFAULTS = {
    "archs": (["vit_small", "vit_base"], ["vit_small"]),
    "engines": (["single", "fsdp"], ["single", "ddp", "fsdp"]),
    "ac": (["none", "full"], ["none"]),
    "batch": (64, 8),
    "global_size": (224, 64),
    "local_size": (96, 32),
    "precision": ("auto", "fp32"),
    "device": ("auto", "cpu"),
    "out": ("bench_step.json", "bench_step_ops.json"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", help="default vit_small vit_base (--count-ops: vit_small)")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES),
                   help="default single fsdp (--count-ops: single ddp fsdp; deepspeed on request)")
    p.add_argument("--zero-stage", nargs="+", type=int, default=[2], choices=[1, 2, 3],
                   help="with --engines deepspeed: a row per ZeRO stage (default 2)")
    p.add_argument("--ac", nargs="+", choices=["none", "full", "every_k"], help="default none full (--count-ops: none)")
    p.add_argument("--compile", nargs="*", choices=["off", "on"],
                   help="torch.compile of the transformer blocks: off (default), on, or both (--compile off on); "
                        "--compile alone means on")
    p.add_argument("--batch", type=int, help="images per step (default 64; --count-ops: 8)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--global-size", type=int, help="default 224 (--count-ops: 64)")
    p.add_argument("--local-size", type=int, help="default 96 (--count-ops: 32)")
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--memory-size", type=int, default=131072)
    p.add_argument("--partition-size", type=int, default=16384)
    p.add_argument("--chunk-rows", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="default auto (--count-ops: fp32)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: massl.flops table)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setting")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (--count-ops: cpu)")
    p.add_argument("--out", help="JSON results (default bench_step.json; --count-ops: bench_step_ops.json)")
    p.add_argument("--count-ops", action="store_true", help="count aten ops and host syncs per step instead of timing")
    p.add_argument("--published-ops-script", default=PUBLISHED_OPS_SCRIPT,
                   help="the published step's op counter (default .ref/count_published_ops.py)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny custom ViT, 2x32 + 2x16 px crops, K=256, batch 4, 2 steps, CPU fp32")
    args = p.parse_args(argv)
    for key, defaults in MODE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, defaults[args.count_ops])
    args.compile = [c == "on" for c in (["off"] if args.compile is None else args.compile or ["on"])]
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
    rows: list[dict] = []
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
              "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
              "memory_size": args.memory_size, "partition_size": args.partition_size, "batch": args.batch,
              "rows": rows}
    print(f"{result['device']}, torch {result['torch']}, crops {result['crops']}, K={args.memory_size}, "
          f"P={args.partition_size}, batch {args.batch}" + (f", {args.archs[0]}, {args.precision}" if args.count_ops else ""),
          flush=True)
    if args.count_ops:
        jobs = [lambda: count_published_ops(args)] + [lambda e=e: count_ops(args, device, e) for e in settings(args)]
    else:
        jobs = [lambda s=s: measure(args, device, *s)
                for s in itertools.product(args.archs, settings(args), args.ac, args.compile)]
    for job in jobs:  # the file is rewritten after every row: a run cut short keeps what it measured
        rows.append(job())
        if not args.count_ops:
            add_ratios(rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(ops_table(rows) if args.count_ops else table(rows))
    return rows


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git where the benchmark runs (a copied tree on a GPU machine)
        return "unknown"
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()

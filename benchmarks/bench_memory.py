"""Time and peak memory per rank of the MaSSL loss path, memory sharded vs replicated.

One step of the loss path = draw the step's permutation, massl_loss forward + backward, enqueue
of teacher view 1; its time is the fastest of the timed steps (after warm-up) of the slowest rank. Embeddings are random unit vectors (no network). Each configuration runs in
fresh processes (W ranks, gloo on CPU, NCCL on CUDA; at W = 1 the loss runs without a group), so
its peak is its own:

- CPU: the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before
  each step) minus the resident set before the step, i.e. what the loss path adds on top of the
  bank and the inputs; the largest over the timed steps and ranks. The ranks run with glibc's
  mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the
  resident set at once instead of staying in the heap and hiding the next step's peak.
- CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the step.

The replicated layout (`memory.sharded: false`) at the same W, unchunked, is the reference of
the ratios; at W = 1 the two layouts are the same computation ("single").

    python benchmarks/bench_memory.py                      # CPU, W = 1 and 2, about 3 minutes
    python benchmarks/bench_memory.py --device cuda        # one GPU: W = 1, chunking

With `--save`, instead: the peak memory per rank of a checkpoint save with the `deepspeed` engine
(W=2, ZeRO-2 and ZeRO-3, `--save-arch`, fp32): the engine's part and the teacher file, measured
as above around the two writes, against the size of the fp32 teacher. The teacher is gathered to
the main rank one tensor at a time: the other ranks add about one parameter, the main rank the
teacher it writes (on its CPU).

    python benchmarks/bench_memory.py --save --save-arch vit_small

With `--build`, instead: the peak resident set per rank (VmHWM above the resident set after the
imports and the process group) of building student and teacher as a run does (`build_step`) and
taking `--build-steps` training steps (AdamW, fp32, one image per rank, two global crops of
`--build-img` px, no local crops), W=2, engine ddp against deepspeed ZeRO-3 (which builds the
models partitioned, with zero.Init), each in fresh processes; the ratio is ZeRO-3 / ddp.

    python benchmarks/bench_memory.py --build --build-arch vit_large
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


class _PeakMemory:
    """Peak bytes the code inside `with` adds, on the device the benchmark runs on."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.before


def _rank(rank, world, cfg):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from massl.loss import massl_loss, random_partition_perm
    from massl.memory import MemoryBank

    torch.set_num_threads(cfg["threads"])
    if cfg["device"] == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    group = dist.group.WORLD if world > 1 else None
    sharded = cfg["mode"] == "sharded"
    memory = MemoryBank(cfg["dim"], cfg["size"], group=group, sharded=sharded, seed=0, device=device)
    g = torch.Generator(device=device).manual_seed(rank)
    views, batch, dim = cfg["views"], cfg["batch"], cfg["dim"]
    zs = F.normalize(torch.randn(views, batch, dim, generator=g, device=device), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(2, batch, dim, generator=g, device=device), dim=-1)

    def barrier():
        if group is not None:
            dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, peaks = [], []
    for step in range(cfg["warmup"] + cfg["iters"]):
        zs.grad = None
        barrier()
        with _PeakMemory(device) as peak:
            start = time.perf_counter()
            perm = random_partition_perm(cfg["size"], 0, step, device)
            loss = massl_loss(zs, zt, memory.bank, perm, cfg["partition_size"], 0.1, 0.04,
                              group=group if sharded else None, chunk_rows=cfg["chunk_rows"])
            loss.backward()
            memory.enqueue(zt[1])
            barrier()
            elapsed = time.perf_counter() - start
        if step >= cfg["warmup"]:
            times.append(elapsed)
            peaks.append(peak.peak)
    # The fastest timed step: the machine may be shared, and other users only ever add time.
    return min(times), max(peaks), memory.bank.numel() * memory.bank.element_size()


def run_config(cfg: dict) -> dict:
    """Run one configuration in `cfg['world']` fresh processes; the slowest / largest rank counts."""
    from massl.testing import run_local_ranks

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))  # read by glibc when a rank starts
    results = run_local_ranks(_rank, cfg["world"], cfg, backend="nccl" if cfg["device"] == "cuda" else "gloo",
                              timeout=cfg["timeout"])
    return {"ms": 1000 * max(r[0] for r in results), "peak_mib": max(r[1] for r in results) / 2**20,
            "bank_mib": max(r[2] for r in results) / 2**20}


def _save_rank(rank, world, cfg):
    """Build a deepspeed engine, then measure one save (engine part + teacher file) on this rank."""
    import tempfile

    import torch

    from massl.checkpoint.teacher import TeacherFile
    from massl.config import config_from_dict
    from massl.dist import init_distributed
    from massl.engines import build_engine
    from massl.models import build_student_teacher

    torch.set_num_threads(cfg["threads"])
    run = config_from_dict({"run": {"device": "cpu", "precision": "fp32"}, "model": {"arch": cfg["arch"]},
                            "engine": {"name": "deepspeed", "zero_stage": cfg["stage"]},
                            "data": {"batch_size": 2}}, check_paths=False)
    env = init_distributed("cpu")
    torch.manual_seed(0)
    engine = build_engine(run, env, *build_student_teacher(run))
    teacher_bytes = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in engine.teacher_module.parameters()) * 4
    with tempfile.TemporaryDirectory() as root:
        for part in ("engine", "teacher"):
            os.makedirs(os.path.join(root, part))
        torch.distributed.barrier()
        with _PeakMemory(env.device) as peak:
            engine.save(os.path.join(root, "engine"))
            TeacherFile(engine, env.is_main).save(os.path.join(root, "teacher"))
            torch.distributed.barrier()
    return peak.peak, teacher_bytes


def run_save(args) -> list[dict]:
    from massl.dist import run_local_ranks

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    rows = []
    print(f"checkpoint save, deepspeed, {args.save_arch} fp32, W=2, cpu\n"
          f"{'ZeRO':>4} {'teacher MiB':>11} {'peak MiB main':>13} {'peak MiB other':>14}")
    for stage in (2, 3):
        cfg = {"arch": args.save_arch, "stage": stage, "threads": args.threads}
        results = run_local_ranks(_save_rank, 2, cfg, timeout=args.timeout)
        row = {"zero_stage": stage, "teacher_mib": results[0][1] / 2**20, "peak_mib_main": results[0][0] / 2**20,
               "peak_mib_other": max(r[0] for r in results[1:]) / 2**20}
        rows.append(row)
        print(f"{stage:>4} {row['teacher_mib']:>11.0f} {row['peak_mib_main']:>13.0f} {row['peak_mib_other']:>14.0f}",
              flush=True)
    return rows


def _build_rank(rank, world, cfg):
    """Build engine and objective as a run does, then take a few steps; this rank's peak RSS above the start."""
    import torch

    from massl.config import config_from_dict
    from massl.dist import init_distributed
    from massl.schedules import Hyper
    from massl.train import build_step, train_step

    torch.set_num_threads(cfg["threads"])
    engine = {"name": cfg["engine"], **({"zero_stage": 3} if cfg["engine"] == "deepspeed" else {})}
    run = config_from_dict({"run": {"device": "cpu", "precision": "fp32", "seed": 0},
                            "model": {"arch": cfg["arch"], "patch_size": 16}, "engine": engine,
                            "optim": {"name": "adamw"}, "memory": {"size": 64, "partition_size": 32},
                            "data": {"batch_size": 1, "global_crop_size": cfg["img"], "local_crops_number": 0}},
                           check_paths=False)
    env = init_distributed("cpu")
    torch.distributed.barrier()
    g = torch.Generator().manual_seed(rank)
    crops = [torch.randn(1, 3, cfg["img"], cfg["img"], generator=g) for _ in range(2)]
    h = Hyper(lr=1e-4, wd=0.04, teacher_momentum=0.996, teacher_temp=0.04)
    with _PeakMemory(env.device) as peak:
        start = time.perf_counter()
        engine, objective = build_step(run, env)
        built = time.perf_counter() - start
        for step in range(cfg["steps"]):
            out = train_step(engine, objective, crops, step, h)
        loss = float(out["loss"])
        torch.distributed.barrier()
    return peak.peak, built, time.perf_counter() - start, loss


def run_build(args) -> list[dict]:
    from massl.testing import run_local_ranks

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    rows = []
    print(f"build + {args.build_steps} training steps, {args.build_arch} fp32 AdamW, {args.build_img} px, 1 image/rank, "
          f"W=2, cpu\n{'engine':<12} {'peak MiB/rank':>13} {'x ddp':>6} {'build s':>8} {'total s':>8} {'loss':>8}")
    for name in args.build_engines:
        cfg = {"engine": name, "arch": args.build_arch, "img": args.build_img, "steps": args.build_steps,
               "threads": args.threads}
        results = run_local_ranks(_build_rank, 2, cfg, timeout=args.timeout)
        row = {"engine": "ddp" if name == "ddp" else "deepspeed zero3", "peak_mib": max(r[0] for r in results) / 2**20,
               "build_s": max(r[1] for r in results), "total_s": max(r[2] for r in results), "loss": results[0][3]}
        ddp = [r for r in rows if r["engine"] == "ddp"] + ([row] if name == "ddp" else [])
        row["peak_ratio"] = row["peak_mib"] / ddp[0]["peak_mib"] if ddp else float("nan")
        rows.append(row)
        print(f"{row['engine']:<12} {row['peak_mib']:>13.0f} {row['peak_ratio']:>6.2f} {row['build_s']:>8.1f} "
              f"{row['total_s']:>8.1f} {row['loss']:>8.4f}", flush=True)
    return rows


def _configs(args) -> list[dict]:
    base = {k: getattr(args, k) for k in ("device", "size", "dim", "views", "batch", "partition_size",
                                          "iters", "warmup", "threads", "timeout")}
    configs = []
    for world in args.worlds:
        modes = ("single",) if world == 1 else ("replicated", "sharded")
        for mode in modes:
            for chunk in args.chunk_rows if mode != "replicated" else (0,):
                configs.append({**base, "world": world, "mode": mode, "chunk_rows": chunk})
    return configs


def _machine(device: str) -> str:
    import torch
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    return f"{names[0] if names else cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _write_rows(out: str | None, default_name: str, rows: list[dict], benchmark: str, **fields) -> None:
    """The JSON of a W=2 measurement (--build, --save): its rows with the date and the machine."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": benchmark, "date": datetime.date.today().isoformat(), "machine": _machine("cpu"),
                   **fields, "world_size": 2,
                   "rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]},
                  f, indent=1)
    print(f"wrote {out}")


def main(argv=None) -> None:
    def ints(text):
        return [int(x) for x in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worlds", type=ints, default=None, help="comma list of W (default cpu: 1,2; cuda: 1)")
    parser.add_argument("--chunk-rows", type=ints, default=[0, 192], help="memory.chunk_rows values (0: unchunked)")
    parser.add_argument("--size", type=int, default=131072, help="K")
    parser.add_argument("--dim", type=int, default=256, help="D")
    parser.add_argument("--views", type=int, default=12, help="V")
    parser.add_argument("--batch", type=int, default=64, help="images per rank")
    parser.add_argument("--partition-size", type=int, default=16384, help="P")
    parser.add_argument("--iters", type=int, default=2, help="timed steps (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/bench_memory_<device>.json)")
    parser.add_argument("--save", action="store_true", help="measure a deepspeed checkpoint save instead (W=2)")
    parser.add_argument("--save-arch", default="vit_small", help="model.arch of the --save rows")
    parser.add_argument("--build", action="store_true",
                        help="measure building the models and training steps instead (W=2, ddp vs ZeRO-3)")
    parser.add_argument("--build-arch", default="vit_large", help="model.arch of the --build rows")
    parser.add_argument("--build-img", type=int, default=224, help="global crop size of the --build rows")
    parser.add_argument("--build-steps", type=int, default=2, help="training steps of the --build rows")
    parser.add_argument("--build-engines", type=lambda t: t.split(","), default=["ddp", "deepspeed"],
                        help="comma list of the --build rows' engines (ddp, deepspeed; ZeRO-3)")
    args = parser.parse_args(argv)
    args.worlds = args.worlds or ([1, 2] if args.device == "cpu" else [1])
    if args.build:
        _write_rows(args.out, "bench_memory_build.json", run_build(args), arch=args.build_arch, img=args.build_img,
                    steps=args.build_steps, benchmark="build student and teacher + training steps, peak RSS per rank, "
                    "ddp vs ZeRO-3")
        return
    if args.save:
        _write_rows(args.out, "bench_memory_save.json", run_save(args), arch=args.save_arch,
                    benchmark="deepspeed checkpoint save (engine part + teacher file), peak per rank")
        return
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_memory_{args.device}.json")

    load_before = os.getloadavg()[0]
    rows = []
    header = f"{'mode':<10} {'W':>2} {'chunk_rows':>10} {'ms/step':>9} {'x ref':>6} {'peak MiB/rank':>13} {'x ref':>6} {'bank MiB/rank':>13}"
    print(f"loss path (perm + massl_loss fwd+bwd + enqueue), K={args.size} D={args.dim} V={args.views} "
          f"B={args.batch}/rank P={args.partition_size}, {args.device}\n{header}")
    for cfg in _configs(args):
        result = {"world": cfg["world"], "mode": cfg["mode"], "chunk_rows": cfg["chunk_rows"], **run_config(cfg)}
        ref = next(r for r in rows + [result] if r["world"] == result["world"] and r["chunk_rows"] == 0)
        result["ms_ratio"] = result["ms"] / ref["ms"]
        result["peak_ratio"] = result["peak_mib"] / ref["peak_mib"]
        rows.append(result)
        print(f"{result['mode']:<10} {result['world']:>2} {result['chunk_rows']:>10} {result['ms']:>9.0f} "
              f"{result['ms_ratio']:>6.2f} {result['peak_mib']:>13.0f} {result['peak_ratio']:>6.2f} "
              f"{result['bank_mib']:>13.0f}", flush=True)

    report = {
        "benchmark": "loss path: random_partition_perm + massl_loss forward+backward + enqueue",
        "date": datetime.date.today().isoformat(), "machine": _machine(args.device),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: other users
        "peak_memory": ("CUDA max_memory_allocated above the allocation before the step" if args.device == "cuda"
                        else "VmHWM above VmRSS before the step (reset via /proc/self/clear_refs), fresh processes"),
        "settings": {k: getattr(args, k) for k in ("device", "size", "dim", "views", "batch", "partition_size",
                                                   "iters", "warmup", "threads")},
        "reference": "replicated (or single at W=1), chunk_rows 0, same W",
        "rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

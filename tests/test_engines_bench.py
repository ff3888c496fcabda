"""Smoke test of benchmarks/bench_step.py --tiny (CPU): every setting runs and reports, and fsdp at
world size 1 trains exactly like single (same loss after the same steps, AC on or off)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import torch.distributed as dist

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_step.py")


def test_bench_step_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / "bench.json")
    had_group = dist.is_initialized()
    try:
        rows = bench.main(["--tiny", "--out", out])
    finally:
        if not had_group and dist.is_initialized():  # fsdp at W=1 started a one-rank group
            dist.destroy_process_group()
    with open(out) as f:
        assert json.load(f)["rows"] == rows
    assert [(r["engine"], r["activation_checkpointing"]) for r in rows] == [
        ("single", "none"), ("single", "full"), ("fsdp", "none"), ("fsdp", "full")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["peak_gib"] > 0 and math.isfinite(r["loss"])
        assert abs(r["loss"] - rows[0]["loss"]) <= 1e-5 * abs(rows[0]["loss"]), r
    assert rows[0]["speed_vs_ref"] == 1.0

"""Smoke test of benchmarks/bench_step.py --tiny (CPU): every setting runs and reports, and fsdp and
deepspeed at world size 1 train exactly like single (same loss after the same steps, AC on or off)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

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


def test_bench_step_tiny_deepspeed(tmp_path):
    """ZeRO-3 in one plain process (no launcher), in a process of its own: DeepSpeed keeps global state."""
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "bench.json")
    done = subprocess.run([sys.executable, SCRIPT, "--tiny", "--engines", "single", "deepspeed", "--zero-stage", "3",
                           "--ac", "none", "--out", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-5000:]
    with open(out) as f:
        rows = json.load(f)["rows"]
    assert [r["engine"] for r in rows] == ["single", "deepspeed-zero3"]
    assert rows[1]["img_per_s"] > 0 and rows[1]["peak_gib"] > 0
    assert abs(rows[1]["loss"] - rows[0]["loss"]) <= 1e-5 * abs(rows[0]["loss"]), rows

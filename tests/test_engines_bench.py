"""Smoke tests of benchmarks/bench_step.py --tiny (CPU): every setting runs and reports; fsdp and
deepspeed at world size 1 train exactly like single (same loss after the same steps, AC on or off);
--count-ops counts every engine's step and runs the published step's counter (here a stand-in
script) with the same shapes."""
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


def _run_bench(argv):
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    had_group = dist.is_initialized()
    try:
        return bench.main(argv)
    finally:
        if not had_group and dist.is_initialized():  # ddp/fsdp at W=1 started a one-rank group
            dist.destroy_process_group()


def test_bench_step_tiny(tmp_path):
    out = str(tmp_path / "bench.json")
    rows = _run_bench(["--tiny", "--out", out])
    with open(out) as f:
        assert json.load(f)["rows"] == rows
    assert [(r["engine"], r["activation_checkpointing"]) for r in rows] == [
        ("single", "none"), ("single", "full"), ("fsdp", "none"), ("fsdp", "full")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["peak_gib"] > 0 and math.isfinite(r["loss"]) and r["tflop_per_image"] > 0
        assert abs(r["loss"] - rows[0]["loss"]) <= 1e-5 * abs(rows[0]["loss"]), r
    assert rows[0]["speed_vs_ref"] == 1.0


STAND_IN = """import json, sys
open(sys.argv[0] + ".args", "w").write(" ".join(sys.argv[1:]))
print("a warning line first")
print(json.dumps({"impl": "published", "total_ops": 5000, "host_scalar_reads": 7, "top": [["aten.mm", 9]]}))
"""


def test_bench_step_count_ops_tiny(tmp_path):
    stand_in = tmp_path / "count_published_ops.py"
    stand_in.write_text(STAND_IN)
    out = str(tmp_path / "ops.json")
    rows = _run_bench(["--tiny", "--count-ops", "--out", out, "--published-ops-script", str(stand_in)])
    with open(out) as f:
        assert json.load(f)["rows"] == rows
    assert (tmp_path / "count_published_ops.py.args").read_text() == (
        "--arch custom --batch 4 --global-size 32 --local-size 16 --local-crops 2 --out-dim 256 --partition-size 64")
    assert rows[0] == {"engine": "published", "reference": True, "total_ops": 5000, "host_scalar_reads": 7,
                       "top": [["aten.mm", 9]]}
    assert [r["engine"] for r in rows[1:]] == ["single", "ddp", "fsdp"]
    for r in rows[1:]:
        assert r["host_scalar_reads"] == 0 and r["dynamic_shape_ops"] == 0, r
        assert 100 < r["non_view_ops"] < r["total_ops"], r


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

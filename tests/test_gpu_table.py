"""benchmarks/gpu_table.py merges the GPU check's parts into one table with ratios to the
published step measured in the same call; failed or missing parts give rows without ratios."""
from __future__ import annotations

import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_table.py")
spec = importlib.util.spec_from_file_location("gpu_table", SCRIPT)
gpu_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_table)

PUBLISHED = {"device": "NVIDIA H200", "rows": [
    {"ok": True, "impl": "seed", "arch": "vit_base", "bs": 64, "img_s": 250.0, "peak_gib": 25.0, "step_s": 0.256, "mfu": 0.12},
    {"ok": True, "impl": "lean", "arch": "vit_base", "bs": 64, "img_s": 500.0, "peak_gib": 18.0, "step_s": 0.128, "mfu": 0.24},
    {"ok": False, "impl": "seed", "arch": "vit_small", "bs": 128, "err": "OOM"}]}
STEP = {"device": "NVIDIA H200", "rows": [
    {"arch": "vit_base", "engine": "single", "activation_checkpointing": "none", "compile": False, "batch": 64,
     "precision": "bf16", "img_per_s": 625.0, "step_ms": 102.4, "peak_gib": 20.0, "mfu": 0.3},
    {"arch": "vit_base", "engine": "fsdp", "activation_checkpointing": "full", "compile": False, "batch": 64,
     "error": "out of memory"},
    {"arch": "vit_small", "engine": "single", "activation_checkpointing": "none", "compile": False, "batch": 128,
     "precision": "bf16", "img_per_s": 1000.0, "step_ms": 128.0, "peak_gib": 10.0, "mfu": 0.1}]}
LOSS = {"settings": {"batch": 64}, "rows": [{"world": 1, "mode": "single", "chunk_rows": 0, "ms": 5.12}]}


def test_ratios_to_the_published_step(tmp_path):
    paths = {}
    for name, data in (("published", PUBLISHED), ("step", STEP), ("loss", LOSS)):
        paths[name] = str(tmp_path / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(data, f)
    rows = gpu_table.main([paths["published"], paths["step"], str(tmp_path / "missing.json"), "--loss", paths["loss"],
                           "--out", str(tmp_path / "out.json"), "--md", str(tmp_path / "table.md")])
    by_what = {(r["arch"], r["batch"], r["what"]): r for r in rows}
    massl = by_what[("vit_base", 64, "massl single, AC none, bf16")]
    assert massl["speed_vs_published"] == 625.0 / 250.0 and massl["memory_vs_published"] == 20.0 / 25.0
    lean = by_what[("vit_base", 64, "timm bf16 backbone+head only")]
    assert lean["speed_vs_published"] == 2.0
    assert by_what[("vit_base", 64, "massl fsdp, AC full")]["error"] == "out of memory"
    assert by_what[("vit_small", 128, "published step")]["error"] == "OOM"
    small = by_what[("vit_small", 128, "massl single, AC none, bf16")]
    assert "speed_vs_published" not in small  # its reference failed: no ratio
    loss = next(r for r in rows if r["what"].startswith("loss path"))
    assert loss["share_of_step"] == 5.12 / 102.4
    assert "2.50" in (tmp_path / "table.md").read_text()
    assert gpu_table.main([str(tmp_path / "none.json")]) == []  # nothing measured: an empty table, no crash

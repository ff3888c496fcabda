"""A resume compares engine settings by effect: a DeepSpeed options file by content, not path;
FSDP resharding may change; the lists of what may change in the docs are the code's."""
import json
import os
import re

from massl.checkpoint.resume import COMPARED_BY_CONTENT, RESUME_MAY_CHANGE, config_changes, deepspeed_config_change
from massl.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ds_config(tmp_path, name: str, options: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(options))
    return str(path)


def test_the_deepspeed_options_file_is_compared_by_content(tmp_path):
    base = [f"data.path={tmp_path}", "engine.name=deepspeed"]
    a = ds_config(tmp_path, "a.json", {"wall_clock_breakdown": False})
    same = ds_config(tmp_path, "copy.json", {"wall_clock_breakdown": False})
    other = ds_config(tmp_path, "other.json", {"wall_clock_breakdown": True})
    saved = load_config(None, base + [f"engine.deepspeed_config={a}"])
    manifest = {"config": saved.to_dict(), "deepspeed_options": {"wall_clock_breakdown": False}}
    moved = load_config(None, base + [f"engine.deepspeed_config={same}"])
    assert config_changes(manifest["config"], 1, moved, 1) + deepspeed_config_change(manifest, moved) == []  # before: refused
    changed = load_config(None, base + [f"engine.deepspeed_config={other}"])
    assert deepspeed_config_change(manifest, changed) == [
        f"engine.deepspeed_config {a!r} -> {other!r} (other DeepSpeed options)"]
    # the same path whose file was edited since the checkpoint is a change too
    with open(a, "w") as f:
        json.dump({"wall_clock_breakdown": True}, f)
    assert deepspeed_config_change(manifest, saved) != []


def test_fsdp_resharding_may_change(tmp_path):
    base = [f"data.path={tmp_path}", "engine.name=fsdp"]
    saved = load_config(None, base).to_dict()
    assert config_changes(saved, 2, load_config(None, base + ["engine.fsdp_reshard_after_forward=true"]), 2) == []
    zero = config_changes(load_config(None, [f"data.path={tmp_path}", "engine.name=deepspeed"]).to_dict(), 1,
                          load_config(None, [f"data.path={tmp_path}", "engine.name=deepspeed", "engine.zero_stage=3"]), 1)
    assert zero == ["engine.zero_stage 2 -> 3"]


def documented_keys(doc: str, start: str, end: str) -> set:
    text = open(os.path.join(ROOT, "docs", doc)).read()
    i = text.index(start)
    return set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", text[i:text.index(end, i)]))


def test_the_docs_list_what_the_code_accepts():
    code = RESUME_MAY_CHANGE | COMPARED_BY_CONTENT
    assert documented_keys("reliability.md", "A resume may change how the run goes on", "is refused.") - {
        "engine.zero_stage", "data.batch_size"} == code
    assert documented_keys("config.md", "A resume refuses a config that changes any key but", "and the global batch") == code

"""Starting a run in its output directory: which checkpoint it continues, whether its settings
may continue it, and one history per run directory.

- The checkpoint: run.resume=auto takes the newest one whose files all match their checksums
  (older ones after a warning naming the damaged file); an explicit one must match too.
- The settings: a resume may change how long and how the run goes on (RESUME_MAY_CHANGE); any
  other key that differs from the checkpoint's config is refused, naming the keys, before
  anything is read or moved.
- The history: a checkpoint directory holds one run's history only. Whatever belongs to
  another (the checkpoints of a previous run when this one starts from scratch, or those after
  the step this one resumes from, and the metrics they logged) is moved to
  `<output_dir>/superseded/<UTC time>/`, never resumed and never pruned; so `latest` and
  keep_last only ever see this run's checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Optional

from ..config import RENAMED, Config, ConfigError
from ..fileio import write_text_atomic
from ..logging import log
from .manager import CheckpointManager, read_checkpoint_manifest, verify

# Keys whose change a resume accepts: how long, where and on what the run goes on, how it logs
# and checkpoints. Every other key (model, memory, loss, optimiser, schedules, data and
# augmentation, seed) defines what is trained.
RESUME_MAY_CHANGE = frozenset({
    "run.output_dir", "run.resume", "run.max_steps", "run.threads", "run.device", "run.precision",
    "run.log_every", "run.log_all_ranks", "run.tensorboard", "run.checkpoint_every", "run.keep_last",
    "memory.sharded", "memory.chunk_rows",
    "data.path", "data.urls", "data.manifest", "data.num_workers", "data.gpu_augment", "data.timeout_s",
    "engine.name", "engine.activation_checkpointing", "engine.ac_every", "engine.compile",
    "model.init_from", "model.init_from_trust",  # a resume's weights come from the checkpoint
    "engine.fsdp_reshard_after_forward",  # when FSDP frees gathered weights: memory and speed only
})
# Compared by what the file holds, not by its path (deepspeed_options below)
COMPARED_BY_CONTENT = frozenset({"engine.deepspeed_config"})
SUPERSEDED = "superseded"
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "config.yaml", "tb", "eval")  # besides checkpoints/


def checkpoint_to_resume(cfg: Config, ckpt: CheckpointManager) -> Optional[str]:
    """Collective: the verified checkpoint that run.resume names (auto: the newest), or None."""
    setting = cfg.run.resume
    if setting == "never":
        return None
    if setting == "auto":
        return ckpt.latest_verified()
    ok, reason = verify(setting, ckpt.group)
    if not ok:
        raise ConfigError(f"run.resume: checkpoint {setting} cannot be used: {reason}; name another checkpoint, "
                          f"or use run.resume=auto")
    return setting


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[RENAMED.get(prefix + k, prefix + k)] = v
    return out


def config_changes(saved: dict, saved_world: int, cfg: Config, world: int) -> list[str]:
    """'key old -> new' for each key of a checkpoint's config (`saved`, run on `saved_world`
    ranks) that `cfg` (on `world` ranks) changes and a resume may not. data.batch_size is per
    rank: the global batch is what must stay. Keys the checkpoint does not record (older
    massl) are not compared."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    changes = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
               if k not in RESUME_MAY_CHANGE | COMPARED_BY_CONTENT | {"data.batch_size"} and old[k] != new[k]]
    if "data.batch_size" in old and old["data.batch_size"] * saved_world != cfg.data.batch_size * world:
        changes.append(f"global batch (data.batch_size x ranks) {old['data.batch_size']} x {saved_world} -> "
                       f"{cfg.data.batch_size} x {world}")
    return changes


def deepspeed_options(path: str) -> Optional[dict]:
    """The DeepSpeed options a engine.deepspeed_config file holds ({} for none; None if unreadable)."""
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def deepspeed_config_change(manifest: dict, cfg: Config) -> list[str]:
    """engine.deepspeed_config compared by effect: the options the checkpoint recorded (or, for a
    checkpoint that did not record them, those its file holds now) against this run's file."""
    old_path = manifest.get("config", {}).get("engine", {}).get("deepspeed_config", "")
    new_path = cfg.engine.deepspeed_config
    if old_path == new_path and "deepspeed_options" not in manifest:
        return []
    old = manifest.get("deepspeed_options", deepspeed_options(old_path))
    if old is not None and old == deepspeed_options(new_path):
        return []
    return [f"engine.deepspeed_config {old_path!r} -> {new_path!r} (other DeepSpeed options)"]


def check_config(directory: str, cfg: Config, world: int) -> None:
    manifest = read_checkpoint_manifest(directory)
    changes = config_changes(manifest.get("config", {}), manifest.get("world_size", 1), cfg, world)
    changes += deepspeed_config_change(manifest, cfg)
    if changes:
        raise ConfigError(
            f"run.resume: checkpoint {directory} was trained with other settings: {', '.join(changes)}; a resume "
            f"may change only how the run goes on (run.max_steps, logging, checkpointing, devices, the engine's "
            f"name, activation checkpointing, compile and FSDP resharding, data location). Resume with the checkpoint's values, or start a new run (another run.output_dir, or "
            f"run.resume=never, which moves this run's outputs aside)")


def start_history(output_dir: str, ckpt: CheckpointManager, base: Optional[str]) -> None:
    """Main rank: set the run's history id (the base checkpoint's, or a new one) and move aside
    what belongs to another history (module docstring)."""
    manifest = read_checkpoint_manifest(base) if base else {}
    ckpt.history = manifest.get("history") or uuid.uuid4().hex[:12]
    here = base is not None and os.path.dirname(os.path.realpath(base)) == os.path.realpath(ckpt.root)
    other = [path for step, path in ckpt.step_dirs() if not (here and _same_history(path, step, manifest))]
    outputs = [os.path.join(output_dir, name) for name in RUN_OUTPUTS if not here]
    outputs = [p for p in outputs if os.path.exists(p)]
    metrics = os.path.join(output_dir, "metrics.jsonl")
    later = _records_after(metrics, manifest["step"]) if here else []
    if not (other or outputs or later):
        return
    aside = os.path.join(output_dir, SUPERSEDED, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(os.path.join(aside, "checkpoints"), exist_ok=True)
    for path in other:
        shutil.move(path, os.path.join(aside, "checkpoints", os.path.basename(path)))
    for path in outputs:
        shutil.move(path, os.path.join(aside, os.path.basename(path)))
    if later:
        _split_metrics(metrics, manifest["step"], os.path.join(aside, "metrics.jsonl"))
    latest = os.path.join(ckpt.root, "latest")
    if here:
        assert base is not None  # `here` implies a base
        write_text_atomic(latest, os.path.basename(base) + "\n")
    elif os.path.exists(latest):
        os.remove(latest)
    why = (f"this run resumes from step {manifest['step']}" if here else
           "this run starts from scratch (run.resume=never, or no usable checkpoint)" if base is None else
           f"this run resumes from {base}, outside this directory")
    log.warning(f"massl: {why}: moved what belongs to another history ({len(other)} checkpoint(s)"
                + (f", {len(later)} metrics record(s) after that step" if later else "")
                + (f", {', '.join(os.path.basename(p) for p in outputs)}" if outputs else "")
                + f") to {aside}; it is kept, not resumed, not pruned")


def _same_history(path: str, step: int, base: dict) -> bool:
    """A checkpoint of the base's history up to its step (an unreadable manifest is not)."""
    try:
        history = read_checkpoint_manifest(path).get("history")
    except (OSError, ValueError):
        return False
    return step <= base["step"] and (history == base.get("history") or history is None or base.get("history") is None)


def _records_after(path: str, step: int) -> list[str]:
    """metrics.jsonl lines logged after `step` (a crash after the checkpoint), or cut short."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if not _logged_by(line, step)]


def _logged_by(line: str, step: int) -> bool:
    try:
        return line.endswith("\n") and json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
        return False


def _split_metrics(path: str, step: int, aside: str) -> None:
    with open(path) as f:
        lines = f.readlines()
    with open(aside, "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines if not _logged_by(line, step))
    write_text_atomic(path, "".join(line for line in lines if _logged_by(line, step)))

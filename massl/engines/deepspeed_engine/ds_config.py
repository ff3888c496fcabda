"""The DeepSpeed config massl gives `deepspeed.initialize`.

massl builds it from its own keys (per-rank batch, precision, ZeRO stage, no clipping by
DeepSpeed) and merges the user's `engine.deepspeed_config` JSON, which holds DeepSpeed's own
options (bucket sizes, overlap, prefetching, communication dtype, ...). A user file that sets
what massl owns is refused with the massl key to use instead; options whose code paths massl's
clipping and teacher EMA do not support are refused with the reason.
"""
from __future__ import annotations

import copy
import json
import os

from ...config import Config, ConfigError

KEY = "engine.deepspeed_config"

# DeepSpeed key (dotted) -> the massl key(s) that set it
MASSL_OWNED = {
    "train_batch_size": "data.batch_size (per rank; the global batch is data.batch_size x ranks)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "data.batch_size (massl does not accumulate gradients)",
    "optimizer": "optim.name, optim.lr, optim.betas and optim.weight_decay",
    "scheduler": "optim.lr, optim.min_lr, optim.warmup_epochs and optim.weight_decay_end (massl's schedules)",
    "gradient_clipping": "optim.clip_grad and optim.clip_mode",
    "fp16": "run.precision",
    "bf16": "run.precision",
    "bfloat16": "run.precision",
    "amp": "run.precision",
    "torch_autocast": "run.precision",
    "data_types": "run.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.compute_grad_norm": "optim.clip_grad (massl computes the norms itself)",
    "zero_allow_untested_optimizer": "optim.name",
    "zero_force_ds_cpu_optimizer": "optim.name",
    "checkpoint": "run.resume (massl resumes with explicit tags and converts to universal checkpoints itself)",
}
# DeepSpeed key -> why massl refuses it
UNSUPPORTED = {
    "zero_optimization.offload_optimizer": "the fp32 master weights and gradients must stay on the device, "
                                           "where massl clips per parameter and updates the teacher from them",
    "zero_optimization.offload_param": "the teacher is partitioned like the student's device partitions",
    "zero_optimization.zero_hpz_partition_size": "secondary (hpZ) partitions would keep stale teacher copies",
    "zero_optimization.mics_shard_size": "MiCS partitions the parameters differently from the teacher",
    "zero_optimization.zero_quantized_weights": "the teacher EMA needs exact partitions",
    "zero_optimization.zenflow": "ZenFlow updates outside the step that massl clips",
    "pipeline": "massl trains data-parallel only",
    "tensor_parallel": "massl trains data-parallel only",
}


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_user_config(path: str) -> dict:
    """The user's DeepSpeed options, refused (ConfigError naming the key) if they set what massl owns."""
    if not os.path.isfile(path):
        raise ConfigError(f"{KEY}: file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{KEY}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("zero_optimization", {}), dict):
        raise ConfigError(f"{KEY}: {path} must hold a JSON object (and zero_optimization an object)")
    for key, massl_key in MASSL_OWNED.items():
        if _lookup(data, key) is not None:
            raise ConfigError(f"{KEY}: {path} sets {key!r}, which massl sets from {massl_key}; remove it from the file")
    for key, why in UNSUPPORTED.items():
        value = _lookup(data, key)
        if value not in (None, False, 0, {}) and not (isinstance(value, dict) and value.get("device") == "none"):
            raise ConfigError(f"{KEY}: {path} sets {key!r}, which massl does not support: {why}; remove it")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def student_config(cfg: Config, precision: str) -> dict:
    """The student engine's config: massl's keys, then the user's file merged in."""
    stage = cfg.engine.zero_stage
    zero = {"stage": stage}
    if stage < 3:
        zero["compute_grad_norm"] = False  # massl computes the norms it clips with (no host sync for them)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed >= 0.19.3 clips at 1.0 by default; massl clips itself
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},  # a non-finite step is skipped
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},  # dynamic loss scaling
        # torch's SGD is elementwise like AdamW, but outside DeepSpeed's list of ZeRO-tested optimizers
        "zero_allow_untested_optimizer": cfg.optim.name == "sgd",
        "steps_per_print": 2**31 - 1,  # massl logs; DeepSpeed's own step lines would repeat it
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["communication_data_type"] = "fp32"  # gradients averaged in fp32, as the fsdp engine does
    user = read_user_config(cfg.engine.deepspeed_config) if cfg.engine.deepspeed_config else {}
    return _merge(ds, user)


def teacher_config(student: dict) -> dict:
    """ZeRO-3 only: the teacher's engine, without an optimiser. Every parameter is released after
    use (persistence threshold 0), so the EMA, which writes the partitions, leaves no stale copy."""
    zero = {k: v for k, v in student["zero_optimization"].items() if k != "compute_grad_norm"}
    zero.update(stage=3, stage3_param_persistence_threshold=0)
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16", "steps_per_print",
            "wall_clock_breakdown", "communication_data_type")
    return {**{k: copy.deepcopy(student[k]) for k in keep if k in student}, "zero_optimization": zero}

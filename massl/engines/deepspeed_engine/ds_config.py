"""The DeepSpeed config massl gives `deepspeed.initialize`, and the checks of a user's own file.

massl builds it from its own keys (per-rank batch, precision, ZeRO stage, no clipping by
DeepSpeed, no throughput timer) and merges the user's `engine.deepspeed_config` JSON, which holds
DeepSpeed's own options (bucket sizes, overlap, prefetching, communication dtype, ...).

Two checks, each a ConfigError naming the key:
- `check_user_file` (before any data or model is built): a key massl sets may repeat massl's
  value (or say "auto"); another value is a conflict naming both keys. Options whose code paths
  massl's clipping, teacher EMA or gradient averaging do not support are refused with the reason.
- `check_built` (after `deepspeed.initialize`, before step 1): the same refusals on the config
  DeepSpeed parsed, which is what the engine runs with (deprecated aliases such as `cpu_offload`
  included, whatever spelling reached it).
"""
from __future__ import annotations

import copy
import json
import os

from ...config import Config, ConfigError

KEY = "engine.deepspeed_config"
AUTO = "auto"  # as in Hugging Face's ds_config files: "use what the trainer sets"

# DeepSpeed key (dotted) -> the massl key(s) that set it
MASSL_OWNED = {
    "train_batch_size": "data.batch_size (per rank; the global batch is data.batch_size x ranks)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "data.batch_size (massl does not accumulate gradients)",
    "optimizer": "optim.name, optim.lr, optim.betas and optim.weight_decay",
    "scheduler": "optim.lr, optim.min_lr, optim.warmup_epochs and optim.weight_decay_end (massl's schedules)",
    "gradient_clipping": "optim.clip_grad and optim.clip_mode (massl clips itself)",
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
# keys inside a section massl owns that the user may set freely: the fp16 loss scaler's dynamics
PASS_THROUGH = {"fp16": {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                         "consecutive_hysteresis"}}


def _offload_on(value) -> bool:
    device = value.get("device", "none") if isinstance(value, dict) else getattr(value, "device", None)
    return value not in (None, False) and getattr(device, "value", device) not in (None, "none")


def _on(value) -> bool:
    return bool(value)


def _mics_on(value) -> bool:
    return value is not None and value > 0  # -1 (and 0) is MiCS off


# (DeepSpeed key, when it is on, why massl refuses it): judged on the raw file and on DeepSpeed's
# parsed config; a deprecated alias before the key it maps to, so the message names what was written
REFUSED = [
    ("zero_optimization.cpu_offload", _on, "it is DeepSpeed's deprecated name of offload_optimizer, and the fp32 "
     "master weights and gradients must stay on the device, where massl clips per parameter and updates the teacher"),
    ("zero_optimization.offload_optimizer", _offload_on, "the fp32 master weights and gradients must stay on the "
     "device, where massl clips per parameter and updates the teacher from them (also the deprecated cpu_offload)"),
    ("zero_optimization.cpu_offload_param", _on, "it is DeepSpeed's deprecated name of offload_param, and the teacher "
     "is partitioned like the student's device partitions"),
    ("zero_optimization.offload_param", _offload_on, "the teacher is partitioned like the student's device partitions "
     "(also the deprecated cpu_offload_param)"),
    ("zero_optimization.zero_hpz_partition_size", lambda v: (v or 1) > 1,
     "secondary (hpZ) partitions would keep stale teacher copies"),
    ("zero_optimization.mics_shard_size", _mics_on,
     "MiCS partitions the parameters differently from the teacher (and DeepSpeed 0.19.8 removed it)"),
    ("zero_optimization.zero_quantized_weights", _on, "the teacher EMA needs exact partitions"),
    ("zero_optimization.zero_quantized_nontrainable_weights", _on,
     "the teacher's weights (not trained) would be quantized"),
    ("zero_optimization.zero_quantized_gradients", _on, "massl clips the exact averaged gradients"),
    ("zero_optimization.round_robin_gradients", _on,
     "massl clips each parameter's gradient fragment where ZeRO-1/2 keep it; round-robin placement breaks that"),
    ("zero_optimization.zenflow", _on, "ZenFlow updates outside the step that massl clips"),
    ("gradient_allreduce_op", lambda v: str(v if v is not None else "mean").lower() != "mean",
     "massl's gradients are averaged over the ranks (clipping thresholds and learning rates assume it)"),
    ("prescale_gradients", _on, "massl's gradients are averaged once, after the reduction"),
    ("gradient_predivide_factor", lambda v: v not in (None, 1, 1.0),
     "massl's gradients are averaged over the ranks, with no other factor"),
    ("pipeline", lambda v: bool(v) and v != {}, "massl trains data-parallel only"),
    ("tensor_parallel", lambda v: bool(v) and v != {}, "massl trains data-parallel only"),
]
# the built config's attribute for a key whose name differs from the file's
_PARSED_NAMES = {"pipeline": None, "tensor_parallel": None}


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_user_config(path: str) -> dict:
    """The user's DeepSpeed options as written (a JSON object; ConfigError naming the file otherwise)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{KEY}: file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{KEY}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("zero_optimization", {}), dict):
        raise ConfigError(f"{KEY}: {path} must hold a JSON object (and zero_optimization an object)")
    return data


def _owned_conflicts(user: dict, massl: dict, path: str) -> None:
    """A key massl sets is accepted with massl's value or "auto"; a section massl sets is compared
    key by key (its PASS_THROUGH keys are the user's)."""
    for key, massl_key in MASSL_OWNED.items():
        value = _lookup(user, key)
        if value is None or value == AUTO:
            continue
        section = "bf16" if key == "bfloat16" else key  # DeepSpeed's older name of the same section
        mine = _lookup(massl, section)
        if isinstance(value, dict) and isinstance(mine, dict):
            for sub, v in value.items():
                if sub in PASS_THROUGH.get(section, ()) or v == AUTO or (sub in mine and v == mine[sub]):
                    continue
                theirs = f"massl sets it to {mine[sub]!r}" if sub in mine else "massl does not set it"
                raise ConfigError(f"{KEY}: {path} sets '{key}.{sub}' to {v!r}, and {theirs} from {massl_key}; "
                                  f"change {massl_key.split(' ')[0]} or remove '{key}.{sub}' from the file")
        elif value != mine:
            theirs = f"massl sets it to {mine!r}" if mine is not None else "massl does not set it"
            raise ConfigError(f"{KEY}: {path} sets '{key}' to {value!r}, and {theirs} from {massl_key}; "
                              f"change {massl_key.split(' ')[0]} or remove '{key}' from the file")


def _refuse(setting_of, where: str) -> None:
    for key, is_on, why in REFUSED:
        value = setting_of(key)
        if is_on(value):
            raise ConfigError(f"{KEY}: {where} sets '{key}' ({value!r}), which massl does not support: {why}; "
                              "remove it")


def check_user_file(cfg: Config, world_size: int, precision: str) -> None:
    """Before any expensive work: the user's file read and judged against massl's own settings
    (`precision`: the run's, resolved)."""
    if not cfg.engine.deepspeed_config:
        return
    path = cfg.engine.deepspeed_config
    user = read_user_config(path)
    massl = _massl_config(cfg, precision)
    massl["train_batch_size"] = cfg.data.batch_size * world_size
    _owned_conflicts(user, massl, path)
    _refuse(lambda key: _lookup(user, key), path)


def check_built(parsed, what: str = "DeepSpeed's config") -> None:
    """After `deepspeed.initialize`: the refusals judged on the config DeepSpeed parsed (`engine._config`)."""
    def setting_of(key: str):
        if key in _PARSED_NAMES:
            return None  # checked in the file; the parsed config has no single attribute for them
        section, _, name = key.rpartition(".")
        owner = parsed.zero_config if section == "zero_optimization" else parsed
        return getattr(owner, name, None)

    _refuse(setting_of, what)


# ZeRO-3's working set, bounded for ViTs. DeepSpeed's defaults are sized for models of billions of
# parameters: a 5e8-element gradient bucket and 1e9 live or reused parameters keep a whole ViT-L
# student gathered from its forward to its backward and all its gradients in one bucket, so ZeRO-3
# would hold more per rank than ddp. In elements (1e7: 40 MB in fp32); the user's file overrides.
STAGE3_MEMORY = {
    "reduce_bucket_size": 10_000_000,
    "stage3_prefetch_bucket_size": 10_000_000,
    "stage3_max_live_parameters": 10_000_000,
    "stage3_max_reuse_distance": 10_000_000,
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if v == AUTO:
            continue  # massl's value stays
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _massl_config(cfg: Config, precision: str) -> dict:
    stage = cfg.engine.zero_stage
    zero: dict = {"stage": stage}
    if stage < 3:
        zero["compute_grad_norm"] = False  # massl computes the norms it clips with (no host sync for them)
    else:
        zero.update(STAGE3_MEMORY)
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
        # DeepSpeed's throughput timer synchronizes the device at its start (student forward) and
        # stop (step): two full syncs per step that massl does not use. wall_clock_breakdown: true
        # in the user's file turns DeepSpeed's timings on (with their syncs).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if precision == "bf16":
        # gradients averaged in fp32 (as the fsdp engine does) and held in fp32 until the step: the
        # upcast bf16 gradients are summed exactly, and massl's norms and clipping see fp32 values
        ds["communication_data_type"] = "fp32"
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def student_config(cfg: Config, precision: str) -> dict:
    """The student engine's config: massl's keys, then the user's file merged in."""
    user = read_user_config(cfg.engine.deepspeed_config) if cfg.engine.deepspeed_config else {}
    ds = _merge(_massl_config(cfg, precision), user)
    if not _mics_on(ds["zero_optimization"].get("mics_shard_size")):  # "off", a key DeepSpeed 0.19.8 rejects
        ds["zero_optimization"].pop("mics_shard_size", None)
    return ds


# zero_optimization keys that concern the student's optimiser and gradients only: never the teacher's
STUDENT_ONLY = {"compute_grad_norm", "zero_quantized_nontrainable_weights", "zero_quantized_weights",
                "zero_quantized_gradients", "round_robin_gradients", "offload_optimizer", "cpu_offload"}


def teacher_config(student: dict) -> dict:
    """ZeRO-3 only: the teacher's engine, without an optimiser, partitioned like the student (same
    persistence threshold: its small parameters stay gathered, refreshed after each EMA)."""
    zero = {k: v for k, v in student["zero_optimization"].items() if k not in STUDENT_ONLY}
    zero.update(stage=3)
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16", "steps_per_print",
            "wall_clock_breakdown", "timers", "communication_data_type")
    return {**{k: copy.deepcopy(student[k]) for k in keep if k in student}, "zero_optimization": zero}

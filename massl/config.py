"""Typed configuration: YAML files plus dotted `key=value` overrides, validated before any work.

Defaults are the published MaSSL ViT-B/16 recipe (method.md, "Published hyper-parameters").
Every key is documented in docs/config.md; `massl-train --print-config` shows the resolved tree.

Longer than the other modules on purpose: it is the schema (one dataclass field per documented
key), its loading (YAML, typed overrides) and its validation, kept together so that a key's type,
default and checks are read in one place.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_origin, get_type_hints

import yaml

from .errors import UserError
from .logging import log

MIN_TEMPERATURE = 0.025


class ConfigError(UserError):
    """A config key has a bad value; the message names the key and says what to change."""


@dataclass
class RunConfig:
    output_dir: str = "runs/massl"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16
    max_steps: int = 0  # stop after this many steps (0: train all epochs); schedules still span optim.epochs
    threads: int = 0  # torch intra-op threads (0: torch's default)
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    log_every: int = 10
    log_all_ranks: bool = False  # information messages from every rank (warnings and errors always)
    tensorboard: bool = True
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_last: int = 3
    peak_tflops: float = 0.0  # peak TFLOP/s per device for MFU (0: from the device name, massl/flops.py)


@dataclass
class ModelConfig:
    arch: str = "vit_base"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant | custom
    patch_size: int = 16
    embed_dim: int = 0  # custom arch only
    depth: int = 0  # custom arch only
    num_heads: int = 0  # custom arch only
    mlp_ratio: float = 4.0  # custom arch only: MLP hidden width / embed_dim
    init_from: str = ""  # weights to start student and teacher from (massl export/teacher, timm state dict)
    init_from_trust: bool = False  # allow a pickled (.pth/.pt) model.init_from
    pooling: str = "cls"  # cls | mean
    pos_embed_interp: str = "dino"  # dino (published: bicubic, scale (n+0.1)/sqrt(N)) | timm (antialiased, exact size)
    drop_path: float = 0.1  # student only
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    head_use_bn: bool = False


@dataclass
class MemoryConfig:
    size: int = 131072  # K, "out_dim" in the published code
    partition_size: int = 16384  # P
    sharded: str = "auto"  # true: each rank owns size/world slots; false: full replica per rank (published); auto: by massl/scaling.py
    chunk_rows: int = 0  # rows per chunk of the loss (0: all rows at once); bounds peak memory


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 50
    koleo_weight: float = 0.0
    koleo_scope: str = "local"  # local (published: each rank's own batch) | global (the global batch)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lars
    epochs: int = 400
    lr: float = 0.00075  # per 256 images: actual lr = lr * global_batch / 256
    min_lr: float = 2e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd / lars
    clip_grad: float = 3.0  # 0 disables clipping
    clip_mode: str = "per_param"  # per_param (published) | global
    teacher_momentum: float = 0.996  # teacher EMA momentum at step 0, cosine to 1 (published: momentum_teacher)


@dataclass
class AugConfig:
    interpolation: str = "bicubic"  # bicubic | bilinear
    flip_prob: float = 0.5  # horizontal flip, every crop
    color_jitter_prob: float = 0.8  # ColorJitter with the four strengths below, in random order
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # in turns of the hue circle
    grayscale_prob: float = 0.2
    # Gaussian blur (sigma uniform in [0.1, 2]) per crop kind, and solarisation of global crop 2
    blur_prob_global1: float = 1.0
    blur_prob_global2: float = 0.1
    blur_prob_local: float = 0.5
    solarize_prob_global2: float = 0.2
    rotation_degrees: float = 0.0  # random rotation before cropping (0: off, as published)
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    source: str = "imagefolder"  # imagefolder | webdataset
    path: str = ""  # imagefolder root (class sub-folders or flat)
    urls: str = ""  # webdataset shards: brace pattern, local paths or pipe: commands
    manifest: str = ""  # webdataset: manifest.json with per-shard counts ("": the one beside the local shards)
    samples_per_epoch: int = 0  # webdataset: 0 reads the count from the shards' manifest.json
    shuffle_buffer: int = 2000  # webdataset: shuffle block per worker, in samples (held as encoded bytes)
    batch_size: int = 32  # per rank
    num_workers: int = 8
    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crops_scale: list = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list = field(default_factory=lambda: [0.05, 0.32])
    local_crops_number: int = 10
    gpu_augment: str = "auto"  # auto (on with CUDA) | true | false
    decode: str = "cpu"  # cpu (workers decode) | device (workers send JPEG bytes, prepare() decodes)
    draft_decode: bool = True  # decode: cpu: JPEGs at 1/2 or 1/4 scale where every crop allows it (docs/data.md)
    timeout_s: float = 600.0  # the longest one read of an image or shard sample may take before the run ends
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class EngineConfig:
    name: str = "single"  # single | ddp | fsdp | deepspeed
    activation_checkpointing: str = "none"  # none | full | every_k
    ac_every: int = 2  # every_k: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block
    fsdp_reshard_after_forward: bool = False  # fsdp: reshard student blocks after each forward (less memory, 2x their gathers)
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    deepspeed_config: str = ""  # deepspeed: a JSON file of DeepSpeed's own options, merged into massl's


@dataclass
class EvalConfig:
    """k-NN of the teacher during training (docs/eval.md, "During training")."""

    every_epochs: int = 0  # evaluate after every this many epochs (0: never)
    every_steps: int = 0  # and/or after every this many steps (0: never)
    train: str = ""  # labelled image folder or massl-shard shards: the k-NN reference set
    val: str = ""  # labelled image folder or massl-shard shards: the evaluated set
    k: list = field(default_factory=lambda: [20])
    temperature: float = 0.07
    crop_ratio: float = 0.875  # resize to global_crop_size / crop_ratio, centre crop
    batch_size: int = 256  # images per forward pass
    num_workers: int = 2  # image loading processes per rank, alive only during an evaluation


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "run.precision": ("auto", "fp32", "bf16", "fp16"),
    "model.arch": ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant", "custom"),
    "model.pooling": ("cls", "mean"),
    "model.pos_embed_interp": ("dino", "timm"),
    "memory.sharded": ("auto", "true", "false"),
    "loss.koleo_scope": ("local", "global"),
    "optim.name": ("adamw", "sgd", "lars"),
    "optim.clip_mode": ("per_param", "global"),
    "data.source": ("imagefolder", "webdataset"),
    "data.gpu_augment": ("auto", "true", "false"),
    "data.decode": ("cpu", "device"),
    "data.aug.interpolation": ("bicubic", "bilinear"),
    "engine.name": ("single", "ddp", "fsdp", "deepspeed"),
    "engine.zero_stage": (1, 2, 3),
    "engine.activation_checkpointing": ("none", "full", "every_k"),
}


# ----------------------------------------------------------------------------- loading


def _convert(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/CLI value to the schema type of `key`, or raise ConfigError."""
    if get_origin(typ) is list or typ is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [0.32, 1.0], got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, float) and not math.isfinite(value):  # int() of it is a traceback
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML true/false for a key that also takes "auto"
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


# old key -> new key (same section); the old name is still read, with a warning
RENAMED = {"optim.momentum_teacher": "optim.teacher_momentum"}


def _merge(obj: Any, data: dict, prefix: str = "", strict: bool = True) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if key in RENAMED:
            if strict:  # a user's config; a checkpoint of an older run (strict=False) needs no advice
                log.warning(f"{key} is now called {RENAMED[key]}; please rename it")
            key = RENAMED[key]
            k = key.rsplit(".", 1)[1]
        if k not in names:
            if not strict:
                log.warning(f"ignoring config key {key!r} unknown to this version of massl")
                continue
            raise ConfigError(f"{key}: unknown key; valid keys here are {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _merge(current, v, key + ".", strict)
        else:
            setattr(obj, k, _convert(key, v, hints[k]))


class ConfigLoader(yaml.SafeLoader):
    """safe_load that refuses an alias (*name) of a list or mapping: a few such aliases nested
    expand exponentially (a 1 kB "billion laughs" file). Aliases of plain values still work."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} of a list or mapping; write the value out", event.start_mark)
        return super().compose_node(parent, index)


def yaml_problem(e: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here' (PyYAML's message spans several lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _declared_type(key: str) -> Any:
    """The schema type of a dotted key (None for an unknown key or a section)."""
    obj: Any = Config
    parts = RENAMED.get(key, key).split(".")
    for i, p in enumerate(parts):
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
            return None
        hints = get_type_hints(obj)
        if p not in hints:
            return None
        obj = hints[p]
    return None if dataclasses.is_dataclass(obj) else obj


INT_TEXT = re.compile(r"[+-]?(0|[1-9][0-9]*)")  # no leading zero (YAML 1.1 read 0123 as octal 83)
FLOAT_WORDS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def _parse_override(key: str, raw: str) -> Any:
    """An override's text read by the key's declared type: strings and paths literally (a `#` or
    `~` is part of the value), integers and floats strictly, booleans as true/false, lists as a
    YAML flow list. Unknown keys and sections are read as YAML (the merge names the problem)."""
    typ = _declared_type(key)
    text = raw.strip()
    if typ is str:
        return raw
    if typ is int:
        if not INT_TEXT.fullmatch(text):
            raise ConfigError(f"{key}: expected an integer such as 10, got {raw!r}")
        return int(text)
    if typ is float:
        if text.lower() in FLOAT_WORDS:
            return FLOAT_WORDS[text.lower()]  # parsed, then refused by validation with the key's range
        try:
            if text.lower().lstrip("+-") in ("inf", "infinity", "nan") or "_" in text:
                raise ValueError
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number such as 1e-3, got {raw!r}") from None
    if typ is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{key}: expected true or false, got {raw!r}")
        return text.lower() == "true"
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({yaml_problem(e)}); quote it or fix it") from None
    if (typ is list or get_origin(typ) is list) and not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list such as [0.32, 1.0], got {raw!r}")
    return value


def _dotted_to_nested(overrides: list[str]) -> list[dict]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        key, raw = item.split("=", 1)
        value = _parse_override(key.strip(), raw)
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        out.append(nested)
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, check_paths: bool = True) -> Config:
    """Defaults <- YAML file <- dotted overrides, then `validate` (world-size-free checks)."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: file {path!r} does not exist")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                              f"save the file as UTF-8") from None
        try:
            data = yaml.load(text, Loader=ConfigLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({yaml_problem(e)}); fix the file") from None
        _merge(cfg, data)
    nested_overrides = _dotted_to_nested(overrides or [])
    for nested in nested_overrides:
        _merge(cfg, nested)
    _follow_source_override(cfg, nested_overrides)
    validate(cfg, check_paths=check_paths)
    return cfg


# the keys only one data.source reads
SOURCE_KEYS = {"imagefolder": ("path",), "webdataset": ("urls", "manifest", "samples_per_epoch", "shuffle_buffer")}


def _follow_source_override(cfg: Config, nested_overrides: list[dict]) -> None:
    """An override of data.source switches a config file's data over: the other source's keys
    that the file set (and no override) are reset, instead of being refused as having no effect."""
    data_overrides: list[dict] = [n["data"] for n in nested_overrides if isinstance(n.get("data"), dict)]
    if not any("source" in d for d in data_overrides):
        return
    for source, keys in SOURCE_KEYS.items():
        if source == cfg.data.source:
            continue
        for key in keys:
            if not any(key in d for d in data_overrides) and getattr(cfg.data, key) != getattr(DEFAULTS.data, key):
                log.info(f"massl: data.{key} of the config file is not used: data.source is {cfg.data.source}")
                setattr(cfg.data, key, getattr(DEFAULTS.data, key))


def config_from_dict(data: dict, check_paths: bool = True, strict: bool = True) -> Config:
    """A Config from a plain dict (e.g. the copy saved in a checkpoint's manifest). With
    strict=False, keys this version does not know (a run from another version) are ignored."""
    cfg = Config()
    _merge(cfg, data, strict=strict)
    validate(cfg, check_paths=check_paths)
    return cfg


# ----------------------------------------------------------------------------- validation


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config, world_size: Optional[int] = None, check_paths: bool = True,
             device_type: Optional[str] = None) -> None:
    """Reject bad values and combinations with a message that names the key.

    Checks that need the world size (global batch vs memory ring, memory shards) or the device
    run when they are given, i.e. at launch before anything is built; the launch-time call also
    logs the warnings of _check_no_effect (once per run). `check_paths=False` skips the data and
    resume paths (printing a config, reading a finished run's config elsewhere).
    """
    for key, choices in CHOICES.items():
        _require(_get(cfg, key) in choices, key, f"must be one of {', '.join(map(str, choices))}, got {_get(cfg, key)!r}")

    _check_finite(cfg)
    r, m, mem, o, d, a = cfg.run, cfg.model, cfg.memory, cfg.optim, cfg.data, cfg.data.aug
    if device_type is None and r.device == "cpu":
        device_type = "cpu"
    for key in ("run.log_every", "run.checkpoint_every", "run.keep_last", "model.patch_size",
                "model.head_hidden_dim", "model.head_bottleneck_dim", "model.head_layers",
                "memory.size", "memory.partition_size", "optim.epochs", "data.batch_size",
                "data.global_crop_size", "engine.ac_every"):
        _require(_get(cfg, key) >= 1, key, f"must be >= 1, got {_get(cfg, key)}")
    for key in ("run.max_steps", "run.threads", "run.peak_tflops", "memory.chunk_rows", "data.num_workers",
                "data.local_crops_number", "data.samples_per_epoch", "data.shuffle_buffer",
                "optim.lr", "optim.min_lr", "optim.warmup_epochs", "optim.weight_decay",
                "optim.weight_decay_end", "optim.clip_grad", "loss.koleo_weight",
                "loss.warmup_teacher_temp_epochs", "model.drop_path", "data.aug.rotation_degrees"):
        _require(_get(cfg, key) >= 0, key, f"must be >= 0, got {_get(cfg, key)}")
    for key in ("loss.student_temp", "loss.teacher_temp", "loss.warmup_teacher_temp"):
        # The loss exponentiates logits shifted by their bound 1/t: exp(-2/t) must stay a normal fp32.
        _require(_get(cfg, key) >= MIN_TEMPERATURE, key,
                 f"must be >= {MIN_TEMPERATURE} (fp32 range of the partition softmax), got {_get(cfg, key)}")
    for key in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob_global1",
                "blur_prob_global2", "blur_prob_local", "solarize_prob_global2"):
        v = getattr(a, key)
        _require(0 <= v <= 1, "data.aug." + key, f"is a probability, must be in [0, 1], got {v}")
    # colour jitter strengths as torchvision's ColorJitter defines them (factors 1 +- strength, hue in turns)
    for key in ("brightness", "contrast", "saturation"):
        _require(getattr(a, key) >= 0, "data.aug." + key, f"must be >= 0 (torchvision's ColorJitter), got {getattr(a, key)}")
    _require(0 <= a.hue <= 0.5, "data.aug.hue", f"must be in [0, 0.5] (turns of the hue circle), got {a.hue}")
    _require(r.seed >= 0, "run.seed", f"must be >= 0, got {r.seed}")
    _require(d.timeout_s > 0, "data.timeout_s", f"must be > 0 seconds, got {d.timeout_s}")
    _require(0 <= o.momentum <= 1, "optim.momentum", f"must be in [0, 1], got {o.momentum}")
    _require(0 <= o.teacher_momentum <= 1, "optim.teacher_momentum", f"must be in [0, 1], got {o.teacher_momentum}")
    _require(o.min_lr <= o.lr, "optim.min_lr", f"({o.min_lr}) must not exceed optim.lr ({o.lr})")
    _require(o.warmup_epochs <= o.epochs, "optim.warmup_epochs",
             f"({o.warmup_epochs}) must not exceed optim.epochs ({o.epochs})")
    _require(len(o.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two numbers in [0, 1), got {o.betas}")
    _require(m.drop_path < 1, "model.drop_path", f"must be < 1, got {m.drop_path}")
    _require(m.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")

    if m.arch == "custom":
        for key in ("embed_dim", "depth", "num_heads"):
            _require(getattr(m, key) >= 1, f"model.{key}", "must be set (>= 1) when model.arch is custom")
        _require(m.embed_dim % m.num_heads == 0, "model.embed_dim",
                 f"({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})")
    else:
        _require(m.patch_size in (8, 14, 16), "model.patch_size",
                 f"named archs come with patch 8, 14 or 16, got {m.patch_size}; use model.arch=custom for others")

    _require(mem.partition_size <= mem.size, "memory.partition_size",
             f"({mem.partition_size}) must not exceed memory.size ({mem.size}); lower it or raise memory.size")

    for key in ("data.global_crops_scale", "data.local_crops_scale"):
        v = _get(cfg, key)
        _require(len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
                 key, f"must be [min, max] with 0 < min <= max <= 1, got {v}")
    for key in ("mean", "std"):
        v = getattr(a, key)
        _require(len(v) == 3 and all(_is_number(x) for x in v), "data.aug." + key, f"must be 3 numbers (RGB), got {v}")
    _require(all(s > 0 for s in a.std), "data.aug.std", f"must be positive, got {a.std}")
    _require(d.global_crop_size % m.patch_size == 0, "data.global_crop_size",
             f"({d.global_crop_size}) must be divisible by model.patch_size ({m.patch_size})")
    if d.local_crops_number > 0:
        _require(d.local_crop_size >= 1 and d.local_crop_size % m.patch_size == 0, "data.local_crop_size",
                 f"({d.local_crop_size}) must be a positive multiple of model.patch_size ({m.patch_size})")
    if d.decode == "device":  # the device gets uint8 crops, so the photometric ops run there too
        _require(d.gpu_augment != "false", "data.decode",
                 "device decoding runs the photometric ops on the device; set data.gpu_augment to auto or true")
        _require(a.rotation_degrees == 0, "data.decode",
                 "device decoding does not rotate; set data.aug.rotation_degrees to 0 or data.decode to cpu")

    if check_paths and m.init_from:
        _require(os.path.exists(m.init_from), "model.init_from",
                 f"{m.init_from!r} does not exist (a .safetensors state dict, or a massl checkpoint or run directory)")
    if check_paths:  # a finished run's config (export, eval) is read where its data may not exist
        _require(not os.path.exists(r.output_dir) or os.path.isdir(r.output_dir), "run.output_dir",
                 f"{r.output_dir!r} is a file, not a directory; name a directory (it is created if missing)")
        if d.source == "imagefolder":
            _require(bool(d.path), "data.path", "is required when data.source is imagefolder")
            _require(os.path.isdir(d.path), "data.path", f"directory {d.path!r} does not exist")
        else:
            _require(bool(d.urls), "data.urls",
                     "is required when data.source is webdataset (e.g. shards/train-{000000..000099}.tar)")
            _require(not d.manifest or os.path.isfile(d.manifest), "data.manifest",
                     f"file {d.manifest!r} does not exist (massl-shard writes manifest.json beside the shards)")
        _require(not cfg.engine.deepspeed_config or os.path.isfile(cfg.engine.deepspeed_config),
                 "engine.deepspeed_config", f"file {cfg.engine.deepspeed_config!r} does not exist")
        if r.resume not in ("auto", "never"):
            _require(os.path.isdir(r.resume), "run.resume",
                     f"must be auto, never or an existing checkpoint directory, got {r.resume!r}")
            _require(not os.path.isdir(os.path.join(r.resume, "checkpoints")), "run.resume",
                     f"{r.resume!r} is a run directory, not one of its checkpoints; continue it with "
                     f"run.output_dir={r.resume} run.resume=auto, or name a checkpoint, e.g. {r.resume}/checkpoints/step_...")
            _require(os.path.isfile(os.path.join(r.resume, "manifest.json")), "run.resume",
                     f"{r.resume!r} holds no manifest.json: not a complete massl checkpoint; name a checkpoint "
                     f"directory (<run>/checkpoints/step_...)")
    _require(not (r.precision == "fp16" and device_type == "cpu"), "run.precision",
             "fp16 needs a CUDA device (it uses a loss scaler); use fp32 (fastest on a CPU) or bf16")
    _require(not (cfg.engine.name == "deepspeed" and o.name == "lars"), "optim.name",
             "lars computes a trust ratio per parameter, which ZeRO's flat partitions do not keep apart; use adamw "
             "or sgd with engine.name=deepspeed")
    _require(not (cfg.engine.compile and cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3),
             "engine.compile", "is not supported with engine.zero_stage=3 (DeepSpeed gathers and releases each "
             "parameter in module hooks, which torch.compile does not trace on our torch); use engine.zero_stage=1 "
             "or 2, or engine.compile=false")
    _check_no_effect(cfg, warn=world_size is not None)
    _validate_eval(cfg.eval, check_paths)

    if world_size is not None:
        g = world_size * d.batch_size
        _require(mem.size % g == 0, "memory.size",
                 f"({mem.size}) must be a multiple of the global batch ({world_size} ranks x data.batch_size "
                 f"{d.batch_size} = {g}) so the FIFO ring fills evenly; change memory.size or data.batch_size")
        if mem.sharded == "true":
            _require(mem.size % world_size == 0, "memory.size",
                     f"({mem.size}) must be divisible by the world size ({world_size}) to shard the memory")
        if world_size > 1:
            _require(cfg.engine.name != "single", "engine.name",
                     f"is single but {world_size} processes were launched; use ddp, fsdp or deepspeed")


DEFAULTS = Config()


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every number of the config, lists included, is finite: a nan or inf passes every range
    check written as a comparison that is false for nan (or true for inf) and trains on garbage."""
    for f in fields(obj):
        key, v = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_finite(v, key + ".")
            continue
        for x in v if isinstance(v, list) else [v]:
            _require(not isinstance(x, float) or math.isfinite(x), key, f"must be a finite number, got {v}")


def _check_no_effect(cfg: Config, warn: bool) -> None:
    """A key set away from its default where it has no effect is a mistake the run would hide:
    an error naming the key, or, for keys a config file shared across settings may well carry
    (AC period, local-crop and KoLeo details), a warning at launch."""
    m, d, o, lo, e = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.engine
    named = f"model.arch is {m.arch}, whose shape is fixed; use model.arch=custom to set it"
    errors = [
        ("model.embed_dim", m.arch == "custom", named),
        ("model.depth", m.arch == "custom", named),
        ("model.num_heads", m.arch == "custom", named),
        ("model.mlp_ratio", m.arch == "custom", named),
        ("model.init_from_trust", bool(m.init_from), "model.init_from is not set"),
        ("data.path", d.source == "imagefolder", "data.source is webdataset, which reads data.urls"),
        ("data.urls", d.source == "webdataset", "data.source is imagefolder, which reads data.path"),
        ("data.manifest", d.source == "webdataset", "only data.source=webdataset reads a shard manifest"),
        ("data.samples_per_epoch", d.source == "webdataset", "only data.source=webdataset uses it"),
        ("data.shuffle_buffer", d.source == "webdataset", "only data.source=webdataset uses it"),
        ("optim.momentum", o.name in ("sgd", "lars"), "optim.name is adamw, whose moments are optim.betas"),
        ("optim.betas", o.name == "adamw", f"optim.name is {o.name}, which uses optim.momentum"),
        ("engine.zero_stage", e.name == "deepspeed", f"engine.name is {e.name}; only deepspeed has ZeRO stages"),
        ("engine.deepspeed_config", e.name == "deepspeed", f"engine.name is {e.name}; only deepspeed reads it"),
    ]
    warnings_ = [
        ("engine.ac_every", e.activation_checkpointing == "every_k", "engine.activation_checkpointing is not every_k"),
        ("engine.fsdp_reshard_after_forward", e.name == "fsdp", f"engine.name is {e.name}, not fsdp"),
        ("loss.koleo_scope", lo.koleo_weight > 0, "loss.koleo_weight is 0"),
        ("loss.warmup_teacher_temp", lo.warmup_teacher_temp_epochs > 0, "loss.warmup_teacher_temp_epochs is 0"),
        ("data.local_crop_size", d.local_crops_number > 0, "data.local_crops_number is 0"),
        ("data.local_crops_scale", d.local_crops_number > 0, "data.local_crops_number is 0"),
        ("data.aug.blur_prob_local", d.local_crops_number > 0, "data.local_crops_number is 0"),
    ] + [(f"eval.{k}", cfg.eval.every_epochs > 0 or cfg.eval.every_steps > 0,
          "eval.every_epochs and eval.every_steps are 0")
         for k in ("train", "val", "k", "temperature", "crop_ratio", "batch_size", "num_workers")]
    for key, has_effect, why in errors:
        _require(has_effect or _get(cfg, key) == _get(DEFAULTS, key), key,
                 f"is set ({_get(cfg, key)!r}) but has no effect: {why}; remove it")
    if warn:
        for key, has_effect, why in warnings_:
            if not has_effect and _get(cfg, key) != _get(DEFAULTS, key):
                log.warning(f"{key} is set ({_get(cfg, key)!r}) but has no effect: {why}")


def _validate_eval(e: EvalConfig, check_paths: bool) -> None:
    for key in ("every_epochs", "every_steps", "num_workers"):
        _require(getattr(e, key) >= 0, "eval." + key, f"must be >= 0, got {getattr(e, key)}")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    _require(len(e.k) >= 1 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in e.k),
             "eval.k", f"must be a list of integers >= 1, e.g. [20], got {e.k}")
    _require(e.temperature > 0, "eval.temperature", f"must be > 0, got {e.temperature}")
    _require(0 < e.crop_ratio <= 1, "eval.crop_ratio", f"must be in (0, 1], got {e.crop_ratio}")
    if e.every_epochs or e.every_steps:
        for key in ("train", "val"):
            path = getattr(e, key)
            _require(bool(path), "eval." + key, "is required when eval.every_epochs or eval.every_steps is set")
            _require(not check_paths or os.path.exists(path), "eval." + key,
                     f"{path!r} does not exist (a labelled image folder or massl-shard shards)")

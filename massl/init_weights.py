"""model.init_from: start the student and the teacher from existing weights (continued
pretraining, domain adaptation) instead of a random initialisation.

Accepted: a file `massl-export` wrote (a timm backbone state dict), a massl checkpoint's
`teacher/teacher.safetensors` (backbone and projection head), a checkpoint or run directory
(its newest complete checkpoint's teacher), or a timm state dict. `.safetensors` holds tensors
only; a `.pth`/`.pt` file is a pickle, which can run code when read, and is read only with
model.init_from_trust=true. The load is strict: every tensor of the model must be in the file
with its shape, and the file must hold nothing else (a timm classifier, `head.weight` and
`head.bias`, is the one exception: the backbone has none, and it is left out with a message)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .config import Config, ConfigError
from .logging import log
from .models import SSLNet, build_student_teacher, copy_weights_

TIMM_CLASSIFIER = ("head.weight", "head.bias")
WRAPPERS = ("state_dict", "model", "teacher")  # a training script's dict around the weights
SHOWN = 4  # keys named per kind of mismatch


def read_weights(path: str, trust: bool) -> dict:
    """The state dict of `path` on the CPU (see the module docstring for the accepted files)."""
    if os.path.isdir(path):
        from .checkpoint.reader import read_teacher_state_dict, resolve_checkpoint

        try:
            return read_teacher_state_dict(resolve_checkpoint(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: {e}") from None
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"model.init_from: cannot read {path} ({e}); give a .safetensors state dict") from None
    if not trust:
        raise ConfigError(f"model.init_from: {path} is not a .safetensors file; a .pth/.pt file is a pickle, which "
                          f"can run code when read: set model.init_from_trust=true only if you trust its source")
    state = torch.load(path, map_location="cpu", weights_only=False)  # the user trusts it (model.init_from_trust)
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise ConfigError(f"model.init_from: {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN]) + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def load_strict(module: nn.Module, state: dict, path: str, what: str) -> None:
    """module.load_state_dict(state) with every mismatch named in one ConfigError line."""
    from .checkpoint.reader import state_mismatches

    own = module.state_dict()
    # ZeRO-3 partitioned at construction (deepspeed engine): the whole shapes are in ds_shape
    own.update({n: torch.empty(p.ds_shape, dtype=p.dtype, device="meta")
                for n, p in module.named_parameters() if hasattr(p, "ds_shape")})
    problems = state_mismatches(own, state, SHOWN)
    if problems:
        raise ConfigError(f"model.init_from: {path} does not fit the {what} that the model.* keys describe: "
                          f"{'; '.join(problems)}; set model.arch, model.patch_size, ... to the weights' model")
    if any(hasattr(p, "ds_shape") for p in module.parameters()):
        # built by the deepspeed engine's partitioned_build, whose context makes a copy_ into a
        # partitioned parameter act on the whole parameter
        with torch.no_grad():
            for n, t in [*module.named_parameters(), *module.named_buffers()]:
                t.copy_(state[n].to(t.dtype))
        return
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def init_from(nets: list[SSLNet], path: str, trust: bool = False) -> None:
    """Load `path` into each SSLNet of `nets` (student and teacher): backbone and, when the file
    has one (a massl teacher), projection head; otherwise the head keeps its random init."""
    state = read_weights(path, trust)
    if any(k.startswith("backbone.") for k in state):  # a massl teacher: backbone.* and head.*
        parts: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "head": {}}
        for k, v in state.items():
            part, _, rest = k.partition(".")
            parts.setdefault(part, {})[rest] = v
        if parts.keys() != {"backbone", "head"}:
            raise ConfigError(f"model.init_from: {path} has keys outside backbone.* and head.*, e.g. "
                              f"{_names(k for k in state if not k.startswith(('backbone.', 'head.')))}")
        for net in nets:
            load_strict(net.backbone, parts["backbone"], path, "backbone")
            if parts["head"]:
                load_strict(net.head, parts["head"], path, "projection head")
        log.info(f"massl: student and teacher initialised from {path} (backbone"
                 f"{' and projection head' if parts['head'] else ''})")
        return
    dropped = [k for k in TIMM_CLASSIFIER if k in state and k not in nets[0].backbone.state_dict()]
    if dropped:
        log.info(f"massl: model.init_from: leaving out the classifier {', '.join(dropped)} of {path}")
        state = {k: v for k, v in state.items() if k not in dropped}
    for net in nets:
        load_strict(net.backbone, state, path, "backbone")
    log.info(f"massl: student and teacher backbones initialised from {path} (projection head: random init)")


def initial_student_teacher(cfg: Config) -> tuple[SSLNet, SSLNet]:
    """The student and teacher a run starts from: built from cfg.model (massl.models), then, with
    model.init_from set, the student loaded from it and the teacher made its exact copy."""
    student, teacher = build_student_teacher(cfg)
    if cfg.model.init_from:
        init_from([student], cfg.model.init_from, cfg.model.init_from_trust)
        copy_weights_(teacher, student)
    return student, teacher

"""ZeRO-3: student and teacher built already partitioned, with the weights the other engines start from.

Under `deepspeed.zero.Init` each module's parameters are split over the ranks as soon as that
module's `__init__` returns, so no rank ever holds more than one whole module. The initialisers
that run later (timm's `init_weights` at the end of the ViT's `__init__`, massl's CLS-token and
head inits, `model.init_from`) would then act on empty tensors, draw no random numbers and leave
other weights than a plain build. `whole_parameter_ops` makes each torch call on a partitioned
parameter act on the whole parameter: gathered for that call, then re-partitioned with rank 0's
values. Every rank draws from the same seeded stream, in the same order and with the same tensor
sizes as a plain build, so the weights are those of the ddp engine, element for element.

The parameters are built in fp32 (the draws of a plain build); with bf16/fp16 their partitions are
cast afterwards (`cast_partitions_`), as DeepSpeed casts a plain module.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


def is_partitioned(param: Any) -> bool:
    """Whether ZeRO-3 split `param` over the ranks (its whole value is not on this rank)."""
    return hasattr(param, "ds_id") and param.ds_status.name == "NOT_AVAILABLE"


class _WholeParameterOps(TorchFunctionMode):
    """Each torch function whose first argument is a partitioned parameter runs on the whole
    parameter, inside `GatheredParameters(modifier_rank=0)` (a collective: every rank makes the same
    calls in the same order, as they run the same model code)."""

    def __init__(self, gathered_parameters):
        super().__init__()
        self.gathered = gathered_parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if isinstance(target, nn.Parameter) and is_partitioned(target):
            with self.gathered([target], modifier_rank=0):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def partitioned_build(deepspeed, config: dict):
    """The context in which massl builds student and teacher for a ZeRO-3 run: parameters partitioned
    at construction (zero.Init, fp32) and initialisers acting on whole parameters."""
    # fp32 through the config: DeepSpeed 0.19.8's zero.Init turns an explicit dtype=float32 given
    # with a config into bf16 on an accelerator without fp16 (its CPU one)
    fp32 = {**{k: v for k, v in config.items() if k != "bfloat16"}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    with deepspeed.zero.Init(config_dict_or_path=fp32), \
            _WholeParameterOps(deepspeed.zero.GatheredParameters):
        yield


def prepartitioned(module: nn.Module) -> bool:
    """Whether `module` was built under `partitioned_build` (its parameters are ZeRO-3 parameters)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@torch.no_grad()
def cast_partitions_(module: nn.Module, dtype: torch.dtype) -> None:
    """The partitions of `module`'s (partitioned) parameters cast to `dtype`, as DeepSpeed's bf16/fp16
    modes cast a plain module's weights (it only checks a zero.Init model's dtype)."""
    params: list[Any] = list(module.parameters())  # ZeRO-3 parameters (ds_tensor: this rank's piece)
    for p in params:
        if p.ds_tensor.dtype != dtype:
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)
            p.data = p.data.to(dtype)

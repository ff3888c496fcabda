"""The one place where student and teacher are wrapped, in a fixed order, for every engine:

1. BatchNorm -> SyncBatchNorm1d when several ranks share the batch (head with model.head_use_bn);
2. activation checkpointing of the student's transformer blocks (engine.activation_checkpointing);
3. torch.compile of each transformer block, in place (engine.compile);
4. the engine's parallel wrapper (DDP, FSDP2 fully_shard, or nothing).

Steps 2 and 3 keep state-dict keys unchanged (the checkpoint wrapper strips its prefix from
state dicts, `Module.compile` adds none), so checkpoints and exports are the same with them on
or off. The teacher runs without gradients and stores no activations: it gets no checkpointing.
"""
from __future__ import annotations

from typing import Callable, Optional, cast

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from ..config import EngineConfig
from ..dist import world_of
from .sync_bn import convert_sync_batchnorm


def checkpointed_block_indices(depth: int, mode: str, every: int) -> list[int]:
    """Blocks whose activations are recomputed in backward: all (full), every k-th counting from
    the first (every_k: 0, k, 2k, ...), or none."""
    if mode == "full":
        return list(range(depth))
    if mode == "every_k":
        return list(range(0, depth, every))
    return []


def apply_activation_checkpointing(blocks: nn.Sequential, mode: str, every: int) -> None:
    """Wrap the selected blocks (in place) in non-reentrant activation checkpointing, which
    restores the RNG state on recomputation, so drop-path draws the same masks twice."""
    for i in checkpointed_block_indices(len(blocks), mode, every):
        blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def compile_blocks(blocks: nn.Sequential) -> None:
    for block in blocks:
        block.compile()


def _blocks(model: nn.Module) -> nn.Sequential:
    """The transformer blocks of an SSLNet's timm backbone."""
    backbone = cast(nn.Module, model.backbone)
    return cast(nn.Sequential, backbone.blocks)


Parallelize = Callable[[nn.Module, nn.Module], tuple[nn.Module, nn.Module]]


def wrap_models(student: nn.Module, teacher: nn.Module, cfg: EngineConfig, group: Optional[dist.ProcessGroup],
                parallelize: Optional[Parallelize] = None) -> tuple[nn.Module, nn.Module]:
    """Apply steps 1-3 above to SSLNet student and teacher, in place, then step 4 when
    `parallelize` is given; returns what `parallelize` returns (else the modules themselves)."""
    if world_of(group)[1] > 1:
        convert_sync_batchnorm(student, group)
        convert_sync_batchnorm(teacher, group)
    apply_activation_checkpointing(_blocks(student), cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        compile_blocks(_blocks(student))
        compile_blocks(_blocks(teacher))
    return parallelize(student, teacher) if parallelize is not None else (student, teacher)

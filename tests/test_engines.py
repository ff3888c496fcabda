"""Engine wrapping in one process: activation checkpointing and compile keep keys and gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from massl.config import config_from_dict
from massl.engines.wrapping import apply_activation_checkpointing, checkpointed_block_indices, compile_blocks
from massl.models import build_student_teacher
from tests.engines_common import tiny_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    data = tmp_path_factory.mktemp("empty_folder")  # build_student_teacher does not read images
    c = tiny_config(str(data), str(data / "out"))
    c["model"].update(depth=4, drop_path=0.2)
    return config_from_dict(c)


def test_checkpointed_block_indices():
    assert checkpointed_block_indices(4, "none", 2) == []
    assert checkpointed_block_indices(4, "full", 2) == [0, 1, 2, 3]
    assert checkpointed_block_indices(5, "every_k", 2) == [0, 2, 4]
    assert checkpointed_block_indices(12, "every_k", 4) == [0, 4, 8]


@pytest.mark.parametrize("mode", ["full", "every_k"])
def test_activation_checkpointing_keeps_keys_and_gradients(cfg, mode):
    torch.manual_seed(0)
    plain, _ = build_student_teacher(cfg)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped.backbone.blocks, mode, 2)
    expected = checkpointed_block_indices(4, mode, 2)
    assert [i for i, b in enumerate(wrapped.backbone.blocks) if isinstance(b, CheckpointWrapper)] == expected
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())  # loads without renaming

    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    grads = []
    for model in (plain, wrapped):
        torch.manual_seed(1)  # same drop-path masks: checkpointing must replay them on recomputation
        model(crops).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_keeps_state_dict_keys(cfg):
    torch.manual_seed(0)
    plain, _ = build_student_teacher(cfg)
    compiled = copy.deepcopy(plain)
    apply_activation_checkpointing(compiled.backbone.blocks, "full", 1)
    compile_blocks(compiled.backbone.blocks)  # compiles lazily, on the first call: nothing runs here
    assert list(compiled.state_dict()) == list(plain.state_dict())

"""model.init_from (student and teacher from a massl export, a massl teacher, a run directory or a
timm state dict; strict, one-line errors; pickles only when trusted) and the named ViT-L/ViT-g
shapes and model.mlp_ratio, each against timm or the file read independently."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from massl.config import ConfigError, load_config
from massl.export import export_teacher
from massl.init_weights import initial_student_teacher
from massl.models import backbone_spec, build_backbone, build_student_teacher
from tests.conftest import tiny_overrides


@pytest.fixture
def make(digits_dir, tmp_path):
    def make(*extra: str):
        return load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), str(tmp_path / "run")) + list(extra))
    return make


def teacher_file(run: str) -> str:
    ckpt = os.path.join(run, "checkpoints", open(os.path.join(run, "checkpoints", "latest")).read().strip())
    return os.path.join(ckpt, "teacher", "teacher.safetensors")


def assert_has(module: torch.nn.Module, state: dict) -> None:
    own = module.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_init_from_a_massl_export(tiny_run, make, tmp_path):
    out = str(tmp_path / "teacher.safetensors")
    export_teacher(tiny_run, out)
    student, teacher = initial_student_teacher(make(f"model.init_from={out}"))
    ref = load_file(out)
    assert_has(student.backbone, ref)
    assert_has(teacher.backbone, ref)
    # an export has no projection head: the head keeps its random init, not the trained one
    trained_head = {k[5:]: v for k, v in load_file(teacher_file(tiny_run)).items() if k.startswith("head.")}
    assert any(not torch.equal(student.head.state_dict()[k], trained_head[k]) for k in trained_head)


@pytest.mark.parametrize("which", ["teacher.safetensors", "run directory"])
def test_init_from_a_massl_teacher_loads_backbone_and_head(tiny_run, make, which):
    path = teacher_file(tiny_run) if which == "teacher.safetensors" else tiny_run
    student, teacher = initial_student_teacher(make(f"model.init_from={path}"))
    ref = load_file(teacher_file(tiny_run))
    assert_has(student, ref)
    assert_has(teacher, ref)


def test_init_from_a_timm_state_dict_with_its_classifier(make, tmp_path):
    cfg = make()
    spec = backbone_spec(cfg.model, cfg.data.global_crop_size)
    torch.manual_seed(1)
    ref = timm.create_model(spec["model_name"], pretrained=False, **{**spec["kwargs"], "num_classes": 10}).state_dict()
    path = str(tmp_path / "timm.safetensors")
    save_file({k: v.contiguous() for k, v in ref.items()}, path)
    student, teacher = initial_student_teacher(make(f"model.init_from={path}"))
    backbone = {k: v for k, v in ref.items() if not k.startswith("head.")}
    assert_has(student.backbone, backbone)
    assert_has(teacher.backbone, backbone)


def test_init_from_another_shape_is_one_line_naming_the_keys(tiny_run, make, tmp_path):
    out = str(tmp_path / "teacher.safetensors")
    export_teacher(tiny_run, out)
    with pytest.raises(ConfigError) as e:
        initial_student_teacher(make(f"model.init_from={out}", "model.depth=3", "model.embed_dim=48"))
    msg = str(e.value)
    assert msg.startswith("model.init_from:") and "\n" not in msg
    assert "missing, e.g. blocks.2." in msg and "blocks.0.attn.proj.bias (32,) (the model has (48,))" in msg, msg


def test_a_pickle_is_read_only_when_trusted(tiny_run, make, tmp_path, monkeypatch):
    ref = load_file(teacher_file(tiny_run))
    path = str(tmp_path / "dino.pth")
    torch.save({"teacher": {"module." + k: v for k, v in ref.items()}, "epoch": 3}, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ConfigError, match="model.init_from: .*pickle.*model.init_from_trust=true"):
        initial_student_teacher(make(f"model.init_from={path}"))
    assert loads == []  # never opened
    student, _ = initial_student_teacher(make(f"model.init_from={path}", "model.init_from_trust=true"))
    assert_has(student, ref)


def test_init_from_is_checked_at_load(make):
    with pytest.raises(ConfigError, match="model.init_from: '/nonexistent.safetensors' does not exist"):
        make("model.init_from=/nonexistent.safetensors")
    with pytest.raises(ConfigError, match="model.init_from_trust: is set .* no effect"):
        make("model.init_from_trust=true")


@pytest.mark.parametrize("arch,timm_name,patch", [("vit_large", "vit_large_patch16_224", 16),
                                                  ("vit_giant", "vit_giant_patch14_224", 14)])
def test_named_large_and_giant_have_timms_shapes(arch, timm_name, patch):
    cfg = load_config(None, [f"model.arch={arch}", f"model.patch_size={patch}", "data.global_crop_size=224",
                             f"data.local_crop_size={7 * patch}"], check_paths=False)
    with torch.device("meta"):  # shapes only: ViT-g has 1.1 billion parameters
        ours = build_backbone(cfg.model, 224).state_dict()
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_custom_mlp_ratio(make):
    student, _ = build_student_teacher(make("model.mlp_ratio=2.5"))
    assert student.backbone.blocks[0].mlp.fc1.weight.shape == (80, 32)
    with pytest.raises(ConfigError, match="model.mlp_ratio: is set .* no effect"):
        load_config(None, ["model.arch=vit_small", "model.mlp_ratio=3"], check_paths=False)

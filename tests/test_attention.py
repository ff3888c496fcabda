"""The backbone's attention is torch's fused scaled_dot_product_attention at every crop size: the
student (forward and backward) on the global and the local crops, the teacher on the global ones;
no hand-written softmax attention (timm's `fused_attn`, which TIMM_FUSED_ATTN=0 would turn off).
On CUDA, tests/test_gpu.py checks that a flash / memory-efficient / cuDNN kernel runs."""
from __future__ import annotations

import torch

from massl.models import build_student_teacher
from massl.testing.opcount import OpCounter
from tests.test_host_sync import tiny_config


def attention_ops(engine_device: str = "cpu", precision: str = "fp32", **overrides) -> tuple[dict, int]:
    """Ops of one student forward + backward (global and local crops) and one teacher forward."""
    cfg = tiny_config("single", device=engine_device, precision=precision, **overrides)
    student, teacher = (m.to(engine_device) for m in build_student_teacher(cfg))
    assert all(block.attn.fused_attn for m in (student, teacher) for block in m.backbone.blocks)
    sizes = [cfg.data.global_crop_size] * 2 + [cfg.data.local_crop_size] * cfg.data.local_crops_number
    crops = [torch.randn(cfg.data.batch_size, 3, s, s, device=engine_device) for s in sizes]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with OpCounter() as counter, torch.autocast(engine_device, dtype=dtype, enabled=precision == "bf16"):
        student(crops).float().sum().backward()
        with torch.no_grad():
            teacher(crops[:2])
    return dict(counter.ops), cfg.model.depth


def test_fused_attention_at_every_crop_size():
    ops, depth = attention_ops()
    fused = {k: v for k, v in ops.items() if k.startswith("aten._scaled_dot_product")}
    forward = sum(v for k, v in fused.items() if not k.endswith("_backward"))
    backward = sum(v for k, v in fused.items() if k.endswith("_backward"))
    assert forward == 3 * depth, fused  # student global, student local, teacher global
    assert backward == 2 * depth, fused
    assert not any(k in ops for k in ("aten._softmax", "aten.softmax", "aten.bmm")), ops

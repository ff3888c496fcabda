"""Student and teacher networks (method.md, "Networks"): a timm ViT backbone and the projection head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from .config import Config, ModelConfig

# embed_dim, depth, num_heads of the named sizes
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
TIMM_BASE = "vit_base_patch16_224"  # every variant is this timm entry with explicit overrides


def backbone_spec(m: ModelConfig, img_size: int) -> dict:
    """The timm.create_model name and kwargs that rebuild the backbone (also written by massl-export)."""
    dim, depth, heads = ARCHS[m.arch] if m.arch != "custom" else (m.embed_dim, m.depth, m.num_heads)
    return {
        "model_name": TIMM_BASE,
        "kwargs": {
            "img_size": img_size,
            "patch_size": m.patch_size,
            "embed_dim": dim,
            "depth": depth,
            "num_heads": heads,
            "global_pool": "token" if m.pooling == "cls" else "avg",
            "dynamic_img_size": True,  # position embeddings interpolated for local crops
            "num_classes": 0,
        },
    }


def build_backbone(m: ModelConfig, img_size: int, drop_path: float = 0.0) -> nn.Module:
    spec = backbone_spec(m, img_size)
    return timm.create_model(spec["model_name"], pretrained=False, drop_path_rate=drop_path, **spec["kwargs"])


class ProjectionHead(nn.Module):
    """Linear(d, h)-[BN]-GELU-...-Linear(h, out), trunc-normal(0.02) weights, zero biases, then L2 norm."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 3, use_bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        for a, b in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(a, b))
            if use_bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[-1], out_dim))
        self.mlp = nn.Sequential(*layers)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)


class SSLNet(nn.Module):
    """Backbone + head over a multi-crop list: crops of one resolution go through one backbone call."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        batch = crops[0].shape[0]
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        out = self.head(torch.cat(feats))
        return out.view(len(crops), batch, -1)


def build_student_teacher(cfg: Config) -> tuple[SSLNet, SSLNet]:
    """The teacher is an exact copy of the student without drop-path and without gradients."""
    m = cfg.model

    def make(drop_path: float) -> SSLNet:
        backbone = build_backbone(m, cfg.data.global_crop_size, drop_path)
        head = ProjectionHead(backbone.num_features, m.head_hidden_dim, m.head_bottleneck_dim, m.head_layers, m.head_use_bn)
        return SSLNet(backbone, head)

    student, teacher = make(m.drop_path), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher

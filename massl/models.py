"""Student and teacher networks (method.md, "Networks"): a timm ViT backbone and the projection head."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .config import Config, ModelConfig

# embed_dim, depth, num_heads of the named sizes
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1408, 40, 16),  # timm's vit_giant_patch14_224 (ViT-g/14 of DINOv2, with model.patch_size=14)
}
MLP_RATIOS = {"vit_giant": 48 / 11}  # hidden width / embed_dim of the named sizes (others: 4)
TIMM_BASE = "vit_base_patch16_224"  # every variant is this timm entry with explicit overrides


def backbone_spec(m: ModelConfig, img_size: int) -> dict:
    """The timm.create_model name and kwargs that rebuild the backbone (also written by massl-export)."""
    dim, depth, heads = ARCHS[m.arch] if m.arch != "custom" else (m.embed_dim, m.depth, m.num_heads)
    mlp_ratio = MLP_RATIOS.get(m.arch, 4.0) if m.arch != "custom" else m.mlp_ratio
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
            **({"mlp_ratio": mlp_ratio} if mlp_ratio != 4.0 else {}),  # timm's default otherwise
        },
    }


def dino_resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, 1 + N, C] (class token first, N a square grid) -> [1, 1 + grid_h * grid_w, C], as the
    published code (DINO's interpolate_pos_encoding) does: bicubic with scale factor
    (n + 0.1) / sqrt(N), no antialiasing; the +0.1 makes the output size floor(n + 0.1) = n."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if grid_h == grid_w == side:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(grid_h, grid_w)}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


class DinoPosEmbedViT(VisionTransformer):
    """timm's VisionTransformer (same modules, same state dict) whose position embedding is
    resized for other input sizes as in the published code (model.pos_embed_interp=dino);
    timm's own resampling (antialiased, exact size) gives another embedding for the local crops."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_h, grid_w, dim = x.shape  # dynamic_img_size: the patch embedding keeps the grid
        assert self.cls_token is not None and self.pos_embed is not None  # backbone_spec keeps both
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.view(batch, -1, dim)], dim=1)
        return self.pos_drop(x + dino_resize_pos_embed(self.pos_embed, grid_h, grid_w))


def build_backbone(m: ModelConfig, img_size: int, drop_path: float = 0.0) -> VisionTransformer:
    """The ViT of `m`, initialised as the published code: timm's init, then the CLS token
    trunc-normal std 0.02 like the position embedding (timm draws it with std 1e-6)."""
    kwargs = backbone_spec(m, img_size)["kwargs"]
    cls = DinoPosEmbedViT if m.pos_embed_interp == "dino" else VisionTransformer
    model = cls(drop_path_rate=drop_path, **kwargs)
    trunc_normal_(model.cls_token, std=0.02)
    return model


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
    copy_weights_(teacher, student)
    teacher.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """`dst`'s parameters and buffers := `src`'s (the same architecture). Parameters that DeepSpeed's
    ZeRO-3 partitioned at construction (they carry `ds_tensor`, this rank's piece) are copied piece
    by piece: same shapes give the same layout, so no rank needs a whole parameter."""
    if not any(hasattr(p, "ds_tensor") for p in src.parameters()):
        dst.load_state_dict(src.state_dict())
        return
    d: Any  # ZeRO-3 parameters, then buffers (DeepSpeed's attributes are not in torch's types)
    s: Any
    for d, s in zip(dst.parameters(), src.parameters()):
        d.ds_tensor.copy_(s.ds_tensor)
    for d, s in zip(dst.buffers(), src.buffers()):
        d.copy_(s)

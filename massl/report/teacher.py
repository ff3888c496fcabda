"""What the report computes with the teacher backbone: the last block's CLS attention per head,
the patch tokens, and the image features (the backbone's output, as massl-eval uses them)."""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer


@torch.no_grad()
def cls_attention(backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, grid_h, grid_w]: the softmax attention of the CLS token to each patch in the
    last block, per head (the maps of DINO's figures). The block runs its fused attention, which
    returns no weights, so they are recomputed here from the block's input and its qkv weights."""
    attn = cast("Attention", backbone.blocks[-1].attn)  # the blocks of models.build_backbone: timm's own
    seen = []
    handle = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        tokens = backbone.patch_embed(x)  # [B, gh, gw, C] with dynamic_img_size
        grid_h, grid_w = tokens.shape[1:3]
        backbone.forward_features(x)
    finally:
        handle.remove()
    h = seen[-1]
    b, n, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, heads, 1, N]
    prefix = n - grid_h * grid_w  # class (and register) tokens
    return weights[:, :, 0, prefix:].reshape(b, attn.num_heads, grid_h, grid_w)


@torch.no_grad()
def patch_tokens(backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """[B, grid_h, grid_w, C]: the last block's patch tokens after the final norm."""
    grid_h, grid_w = backbone.patch_embed(x).shape[1:3]
    tokens = backbone.forward_features(x)
    return tokens[:, tokens.shape[1] - grid_h * grid_w:].reshape(x.shape[0], grid_h, grid_w, -1)


@torch.no_grad()
def image_features(backbone: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[B, d]: the backbone's output per image (CLS token or mean of patches: model.pooling)."""
    return torch.cat([backbone(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float()

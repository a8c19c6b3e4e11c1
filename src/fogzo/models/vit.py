"""Vision Transformer in the DeiT style (Dosovitskiy et al., 2021; Touvron et al., 2021).

For an image ``x`` of shape ``[B, C, S, S]`` and patch size ``P`` (``N = (S/P)^2``
patches, embedding width ``D``):

    z_0 = [cls; patch_embed(x)] + pos                       [B, N + 1, D]
    z'_l = z_{l-1} + Attn(LN(z_{l-1}))                      (pre-norm blocks)
    z_l  = z'_l + MLP(LN(z'_l)),      MLP(u) = fc2(GELU(fc1(u)))
    y    = head(LN(z_L)[:, 0])                              [B, num_classes]

    Attn(u) = proj(concat_h softmax(q_h k_h^T / sqrt(D/H)) v_h),  [q, k, v] = qkv(u)

``patch_embed`` is a ``Conv2d`` with kernel = stride = ``P``; ``qkv`` is one fused
``nn.Linear(D, 3D)``. The class token and position embedding are parameters of
:class:`ClassTokenAndPosition` (module name ``class_and_position``) so that, like
every other parameter, they are only read inside their owning module's forward.

Factories (parameter counts with 3 input channels):

* :func:`vit_tiny_cifar`: 32x32/4, D=96, 6 blocks, 3 heads; 683,242 with 10 classes.
* :func:`deit_tiny`: 224x224/16, D=192, 12 blocks, 3 heads; 5,543,716 with 100
  classes (5,717,416 with 1000, as in DeiT).
* :func:`deit_small`: 224x224/16, D=384, 12 blocks, 6 heads; 21,704,164 with 100
  classes (22,050,664 with 1000).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassTokenAndPosition",
    "SelfAttention",
    "FeedForward",
    "TransformerBlock",
    "VisionTransformer",
    "vit_tiny_cifar",
    "deit_tiny",
    "deit_small",
]


class ClassTokenAndPosition(nn.Module):
    """Prepends a learned class token and adds a learned position embedding.

    Parameters: ``cls_token`` ``[1, 1, D]`` and ``pos_embed`` ``[1, N + 1, D]``.
    Shapes: ``[B, N, D] -> [B, N + 1, D]``.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (bias as in DeiT).

    Shapes: ``[B, T, D] -> [B, T, D]``. Attention probabilities are not dropped
    out (that would draw from the global RNG inside SDPA); ``dropout`` acts on
    the output projection through an ``nn.Dropout`` module.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, D/H]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class FeedForward(nn.Module):
    """``fc2(drop(GELU(fc1(x))))`` with hidden width ``mlp_ratio * D``; ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DeiT-style ViT classifier (class-token readout, no distillation token).

    Args:
        image_size: side ``S`` of the square input images.
        patch_size: side ``P`` of the square patches; must divide ``S``.
        in_channels: image channels (1 for MNIST, 3 for RGB).
        num_classes: outputs of ``head``.
        dim: token width ``D``.
        depth: number of transformer blocks.
        heads: attention heads ``H`` (``D % H == 0``).
        mlp_ratio: MLP hidden width over ``D``.
        dropout: rate of the ``nn.Dropout`` modules after the position
            embedding, the attention output projection and the MLP layers.

    Shapes: ``[B, in_channels, S, S] -> [B, num_classes]``.
    Module names: ``patch_embed`` (Conv2d), ``class_and_position``,
    ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 96,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.class_and_position = ClassTokenAndPosition(num_patches, dim)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def boundary_layers(self) -> tuple[str, str]:
        """Names of the patch embedding and the classifier."""
        return "patch_embed", "head"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S] -> [B, num_classes]``."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = self.pos_drop(self.class_and_position(patches))  # [B, N + 1, D]
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def _vit_from_preset(
    preset: dict[str, Any], num_classes: int, in_channels: int, image_size: int, overrides: dict[str, Any]
) -> VisionTransformer:
    config = {**preset, **overrides, "image_size": image_size, "in_channels": in_channels}
    return VisionTransformer(num_classes=num_classes, **config)


def vit_tiny_cifar(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **overrides: Any
) -> VisionTransformer:
    """Small ViT for 32x32 images: D=96, 6 blocks, 3 heads, patch 4 (65 tokens).

    683,242 parameters with 3 input channels and 10 classes. ``overrides`` replace
    any other :class:`VisionTransformer` argument (``dim``, ``depth``, ``dropout``, ...).
    """
    preset = dict(patch_size=4, dim=96, depth=6, heads=3, mlp_ratio=4.0)
    return _vit_from_preset(preset, num_classes, in_channels, image_size, overrides)


def deit_tiny(
    num_classes: int = 100, in_channels: int = 3, image_size: int = 224, **overrides: Any
) -> VisionTransformer:
    """DeiT-Tiny: D=192, 12 blocks, 3 heads, 224x224 images, patch 16 (197 tokens)."""
    preset = dict(patch_size=16, dim=192, depth=12, heads=3, mlp_ratio=4.0)
    return _vit_from_preset(preset, num_classes, in_channels, image_size, overrides)


def deit_small(
    num_classes: int = 100, in_channels: int = 3, image_size: int = 224, **overrides: Any
) -> VisionTransformer:
    """DeiT-Small: D=384, 12 blocks, 6 heads, 224x224 images, patch 16 (197 tokens)."""
    preset = dict(patch_size=16, dim=384, depth=12, heads=6, mlp_ratio=4.0)
    return _vit_from_preset(preset, num_classes, in_channels, image_size, overrides)

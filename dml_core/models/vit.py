"""A Vision Transformer (Dosovitskiy et al. 2021) sized for small images: patch embedding, CLS token,
learned position embeddings, pre-norm blocks whose attention uses scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml_core.models.inputs import check_images

# (dim, depth, heads) of the standard sizes (DeiT tiny/small, ViT base).
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, SDPA (flash/memory-efficient kernels when available)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, dim) -> q, k, v each (B, heads, T, head_dim)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """forward returns the final-normed CLS token (`feature_dim` = dim), or logits if `num_classes` is set."""

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_channels: int = 1, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 num_classes: int | None = None):
        super().__init__()
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim
        self.fc = nn.Linear(dim, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, 1 + n_patches, dim) token sequence with position embeddings added."""
        check_images(x, self.in_channels, size=(self.image_size, self.image_size), name="ViT input")
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.norm(self.blocks(self.tokens(x)))[:, 0]
        return self.fc(feats) if self.fc is not None else feats


def default_patch_size(image_size: int) -> int:
    """16 px patches for ImageNet-sized inputs, otherwise the largest of 8, 7, 4, 2, 1 that divides the
    image into at least 7x7 patches (28 -> 7x7 patches of 4 px, 32 -> 8x8 patches of 4 px)."""
    if image_size >= 96 and image_size % 16 == 0:
        return 16
    for p in (8, 7, 4, 2, 1):
        if image_size % p == 0 and image_size // p >= 7:
            return p
    return 1


def vit(size: str, image_size: int = 28, in_channels: int = 1, patch_size: int | None = None, **kwargs) -> ViT:
    """A ViT of a standard size ("tiny", "small", "base"); other ViT arguments pass through."""
    if size not in VIT_SIZES:
        raise ValueError(f"ViT size must be one of {sorted(VIT_SIZES)}, got {size!r}")
    dim, depth, heads = VIT_SIZES[size]
    patch = default_patch_size(image_size) if patch_size is None else patch_size
    return ViT(image_size=image_size, patch_size=patch, in_channels=in_channels,
               **{"dim": dim, "depth": depth, "heads": heads, **kwargs})

"""A small convolutional backbone for 28x28 single-channel images (Fashion-MNIST) and other small sizes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dml_core.models.inputs import check_images
from dml_core.models.norm import NORMS, check_norm, norm2d

SMALL_CNN_NORMS = NORMS + ("none",)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return norm2d(kind, channels, groups=min(8, channels))


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv-norm-ReLU layers, each stage but the last followed by 2x2 max pooling;
    global average pooling at the end makes it work on any input size of at least 2**(stages-1) px.

    `norm`: "batch", "frozen_batch", "group" (see models/norm.py) or "none"."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), norm: str = "batch"):
        super().__init__()
        check_norm(norm, SMALL_CNN_NORMS)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(widths) == 0 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {list(widths)}")
        self.in_channels, self.norm = in_channels, norm
        self.min_size = 2 ** (len(widths) - 1)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(prev, width, 3, padding=1, bias=norm == "none"), _norm(norm, width),
                           nn.ReLU(inplace=True)]
                prev = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_channels, min_size=self.min_size, name="SmallCNN input")
        return self.pool(self.features(x)).flatten(1)

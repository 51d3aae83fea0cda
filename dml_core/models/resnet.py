"""ResNet backbones (He et al. 2016) without torchvision: BasicBlock / Bottleneck, standard widths.

Bottleneck puts the stride on the 3x3 convolution ("ResNet v1.5"), as most modern implementations do.
`small_input=True` swaps the 7x7/stride-2 stem and max pool for one 3x3/stride-1 convolution so that
28-32 px images keep enough spatial resolution. `norm` picks the normalisation layers: "batch" (the
standard BatchNorm), "frozen_batch" or "group" (32 groups); see models/norm.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dml_core.models.inputs import check_images
from dml_core.models.norm import FrozenBatchNorm2d, check_norm, norm2d


def _norm(norm: str, channels: int) -> nn.Module:
    return norm2d(norm, channels, groups=math.gcd(32, channels))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus the (projected where needed) identity."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv3x3(cin, width, stride), _norm(norm, width)
        self.conv2, self.bn2 = _conv3x3(width, cout), _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus the identity."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), _norm(norm, width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), _norm(norm, width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages of residual blocks (widths 64, 128, 256, 512), global average pooling.

    forward returns pooled features of size `feature_dim`, or class logits when `num_classes` is set
    (the classifier exists so that the architecture can be checked against published parameter counts).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], in_channels: int = 3,
                 small_input: bool = False, num_classes: int | None = None,
                 widths: Sequence[int] = (64, 128, 256, 512), norm: str = "batch"):
        super().__init__()
        check_norm(norm)
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must have the same length")
        self.in_channels, self.norm = in_channels, norm
        stem_width = widths[0]
        if small_input:
            self.stem = nn.Sequential(_conv3x3(in_channels, stem_width), _norm(norm, stem_width),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                                      _norm(norm, stem_width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        stages, cin = [], stem_width
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(cin, width, stride=2 if (i > 0 and j == 0) else 1, norm=norm))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_channels, name="ResNet input")
        feats = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(feats) if self.fc is not None else feats


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def resnet(depth: int, in_channels: int = 3, small_input: bool = False, num_classes: int | None = None,
           norm: str = "batch") -> ResNet:
    """The standard ResNet of the given depth (18, 34, 50 or 101)."""
    if depth not in _DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth}")
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, in_channels=in_channels, small_input=small_input, num_classes=num_classes,
                  norm=norm)


def resnet18(**kwargs) -> ResNet:
    return resnet(18, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return resnet(50, **kwargs)

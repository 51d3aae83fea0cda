"""Normalisation layers of the built-in convolutional backbones, chosen by name (`norm=`).

- "batch": nn.BatchNorm2d; in training mode it normalises by the statistics of the batch it is given, so
  a gradient-cached step (METHODS.md 1.4), which forwards the batch in chunks, differs from the full batch.
- "frozen_batch": `FrozenBatchNorm2d`, BatchNorm that always normalises by its running statistics (eval-mode
  normalisation, also in training mode); the affine weight and bias stay trainable. Per-sample, so exact
  under gradient caching. Same state-dict keys as nn.BatchNorm2d, so a "batch" checkpoint loads into it.
- "group": nn.GroupNorm, per-sample statistics: exact under gradient caching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "frozen_batch", "group")
PER_SAMPLE_NORMS = ("frozen_batch", "group")  # exact under gradient caching in training mode


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics are fixed: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,
    in training and eval mode alike. The running statistics are never updated (load them from a checkpoint
    trained with "batch"); `weight` and `bias` are trainable parameters.

    Not a subclass of nn.BatchNorm2d on purpose: `SyncBatchNorm.convert_sync_batchnorm` and BatchNorm checks
    must not take it for one.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))  # BatchNorm2d's keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"FrozenBatchNorm2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS) -> None:
    if norm not in allowed:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in allowed)}, got {norm!r}")


def norm2d(norm: str, channels: int, groups: int) -> nn.Module:
    """The normalisation layer `norm` for `channels` feature maps (`groups` for "group")."""
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    return nn.GroupNorm(groups, channels)

"""Two-tower symmetric CLIP loss (METHODS.md 1.1, last paragraph) with exact distributed semantics (1.2).

Pair `i` is (z_a[i], z_b[i]). With logits `S = z_a z_b^T / tau` over the global batch, the loss is the mean
of the row-wise cross entropy (a -> b, target i) and the column-wise one (b -> a, target i).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale, gather_with_grad, local_slice
from dml_core.losses.tiled import compute_dtype


def _check_towers(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    check_embeddings(z_a, name="z_a")
    check_embeddings(z_b, name="z_b")
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"CLIP: the towers must give one embedding per pair with the same width: "
            f"z_a {tuple(z_a.shape)} vs z_b {tuple(z_b.shape)}"
        )


def _clip_rows(a, b, a_all, b_all, offset: int, tau: float) -> torch.Tensor:
    """Sum over this rank's pairs of both cross entropies (a rows vs all b, b rows vs all a)."""
    dtype = compute_dtype(a.dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        target = torch.arange(offset, offset + a.shape[0], device=a.device)
        a_to_b = a.to(dtype) @ b_all.to(dtype).t() / tau
        b_to_a = b.to(dtype) @ a_all.to(dtype).t() / tau
        return F.cross_entropy(a_to_b, target, reduction="sum") + F.cross_entropy(b_to_a, target, reduction="sum")


def clip_loss(z_a: torch.Tensor, z_b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric CLIP loss of one process's batch of pairs; L2-normalises both towers itself."""
    _check_towers(z_a, z_b)
    a, b = l2_normalize(z_a), l2_normalize(z_b)
    return _clip_rows(a, b, a, b, 0, tau) / (2 * a.shape[0])


class ClipLoss(nn.Module):
    """Symmetric CLIP loss over the global batch; `forward(z_a, z_b)` returns this worker's share.

    Each rank computes both cross entropies for its own pairs against the other tower gathered with
    gradient, and scales the sum by `world_size / (2 B)`, so DDP's averaging yields the exact
    global-batch gradient.
    """

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"ClipLoss: tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.stats: dict[str, float] = {}

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        _check_towers(z_a, z_b)
        a, b = l2_normalize(z_a), l2_normalize(z_b)
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)
        offset = local_slice(a.shape[0]).start
        total = _clip_rows(a, b, a_all, b_all, offset, self.tau)
        self.stats = {"global_batch": float(a_all.shape[0])}
        return total * ddp_scale(2 * a_all.shape[0])

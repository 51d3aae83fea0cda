"""Two-tower symmetric CLIP loss (METHODS.md 1.1, last paragraph) with exact distributed semantics (1.2).

Pair `i` is (z_a[i], z_b[i]). With logits `S = z_a z_b^T / tau` over the global batch, the loss is the mean
of the row-wise cross entropy (a -> b, target i) and the column-wise one (b -> a, target i).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.tiled import compute_dtype

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's clamp of the learnable log scale


def _check_towers(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    check_embeddings(z_a, name="z_a")
    check_embeddings(z_b, name="z_b")
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"CLIP: the towers must give one embedding per pair with the same width: "
            f"z_a {tuple(z_a.shape)} vs z_b {tuple(z_b.shape)}"
        )


def _clip_sum(a, b, a_all, b_all, offset: int, scale) -> torch.Tensor:
    """Sum over this rank's pairs (global rows offset..) of both cross entropies, logits = scale * cosine."""
    dtype = compute_dtype(a.dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        target = torch.arange(offset, offset + a.shape[0], device=a.device)
        a_to_b = a.to(dtype) @ b_all.to(dtype).t() * scale
        b_to_a = b.to(dtype) @ a_all.to(dtype).t() * scale
        return F.cross_entropy(a_to_b, target, reduction="sum") + F.cross_entropy(b_to_a, target, reduction="sum")


def clip_loss(z_a: torch.Tensor, z_b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric CLIP loss of one process's batch of pairs; L2-normalises both towers itself."""
    _check_towers(z_a, z_b)
    a, b = l2_normalize(z_a), l2_normalize(z_b)
    return _clip_sum(a, b, a, b, 0, 1.0 / tau) / (2 * a.shape[0])


def _towers(x: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows laid out as [a_0; b_0; a_1; b_1; ...] (each rank's [z_a; z_b]) into all a and all b."""
    x = x.reshape(world, 2, x.shape[0] // (2 * world), x.shape[1])
    return x[:, 0].reshape(-1, x.shape[-1]), x[:, 1].reshape(-1, x.shape[-1])


class ClipLoss(EmbeddingLoss):
    """Symmetric CLIP loss over the batch of pairs; returns this rank's share (METHODS.md 1.2).

    Each rank's batch is `torch.cat([z_a, z_b])`: pair i is rows i and i + b/2 (the two-view layout of the
    training loop), so `ClipLoss()(torch.cat([z_a, z_b]), labels)` with `labels` (and `ids`, if given)
    equal for the two rows of a pair, e.g. pair ids. Each rank's two cross entropies of its pairs against
    the other tower of the global batch, scaled by `world / (2 B)`: DDP's average is the exact global-batch
    gradient. `learn_scale=True`: logits = `exp(logit_scale) * cosine` with the parameter `logit_scale`
    starting at log(1/tau) and clamped to [0, log 100] before each use (open_clip's convention, which clamps
    it after each optimizer step); average its gradient over ranks with `average_loss_grads`.
    """

    def __init__(self, tau: float = 0.1, learn_scale: bool = False) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"ClipLoss: tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau))) if learn_scale else None

    def _learned_scale(self) -> torch.Tensor:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return self.logit_scale.exp()

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        if batch.q.shape[0] % 2:
            raise ValueError(f"ClipLoss: the batch must be [z_a; z_b], an even number of rows, got {batch.q.shape[0]}")
        for name, values in (("labels", batch.labels_k), ("ids", batch.ids_k)):  # global: every rank raises alike
            if values is not None and not torch.equal(*_towers(values[:, None], batch.world)):
                raise ValueError(f"ClipLoss: the {name} of the two rows of a pair differ: each rank's batch must "
                                 f"be [z_a; z_b] with pair i in rows i and i + b/2")
        scale = 1.0 / self.tau if self.logit_scale is None else self._learned_scale()
        a, b = _towers(batch.q, 1)
        a_all, b_all = _towers(batch.k, batch.world)
        total = _clip_sum(a, b, a_all, b_all, batch.offset // 2, scale)
        self.stats = {"global_batch": float(a_all.shape[0]), "logit_scale": float(torch.as_tensor(scale).detach())}
        return total * ddp_scale(2 * a_all.shape[0], batch.world)

"""Proxy-Anchor over the global batch (METHODS.md 2.1).

    L = (1/|P+|) sum_{p in P+} log(1 + sum_{i: y_i = p} exp(-alpha (cos_ip - delta)))
      + (1/C) sum_p log(1 + sum_{i: y_i != p} exp(alpha (cos_ip + delta)))

`P+`: the proxies with a positive in the global batch. The inner sums run over the global batch and a log
of a sum does not split into per-rank parts, so the loss is exact under data parallelism only on the one
gathered batch (METHODS 1.2): every rank computes the whole loss from `batch.k` (B x C cosines) and returns
it as its share. The mean of the shares is the loss; the gather's backward hands each rank `world` times
the gradient of its own rows, which DDP's average makes exact; the proxies' gradient is the same on every
rank, so `average_loss_grads` keeps it.

Our own code, not a wrapper of pytorch-metric-learning's `ProxyAnchorLoss` (the tests' value reference):
that sums over the batch it is given, so on each rank's local batch it is not the global loss. Fed the
gathered batch it would be exact, but it would make PML (a test dependency) one of the library's for ten
lines of maths, with its own proxy layout beside ArcFace's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dml_core.checks import check_positive
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.proxies import ProxyLoss

ALPHA, DELTA = 32.0, 0.1  # METHODS.md 2.1 defaults


def check_params(alpha: float, delta: float, owner: str = "ProxyAnchor") -> tuple[float, float]:
    """(alpha, delta) checked: alpha > 0, delta >= 0 (the constructor and the config loader both use this)."""
    alpha = check_positive(alpha, "alpha", owner)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"{owner}: delta must be >= 0 and finite, got {delta}")
    return alpha, float(delta)


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per column of `x` (n, C): log(1 + sum of exp(x) over the rows `keep` marks), stably."""
    x = x.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([x, x.new_zeros(1, x.shape[1])]), dim=0)


class ProxyAnchor(ProxyLoss):
    """Proxy-Anchor loss with proxies `W` (num_classes, embedding_dim). `stats`: `proxies_with_positive`
    (|P+|) and the two terms' values `pos` and `neg`, all of the global batch."""

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = ALPHA, delta: float = DELTA,
                 seed: int = 0) -> None:
        super().__init__(num_classes, embedding_dim, seed)
        self.alpha, self.delta = check_params(alpha, delta)

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        self.check_labels(batch.labels_k)
        cos = self.cosines(batch.k)
        positive = F.one_hot(batch.labels_k, self.num_classes).bool()
        n_pos = int(positive.any(dim=0).sum())
        pos = _log1p_sum_exp(-self.alpha * (cos - self.delta), positive).sum() / n_pos  # 0 for p outside P+
        neg = _log1p_sum_exp(self.alpha * (cos + self.delta), ~positive).sum() / self.num_classes
        self.stats = {"proxies_with_positive": float(n_pos), "pos": float(pos.detach()), "neg": float(neg.detach())}
        return pos + neg

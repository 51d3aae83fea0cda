"""ArcFace and CosFace: normalised softmax over class proxies with a margin on the target (METHODS.md 2.1).

    L = mean_i CE(s * [margin(cos_{i,y_i}) for j = y_i; cos_ij otherwise], y_i)
    ArcFace: margin(c) = cos(theta + m), theta = acos(c)   (s = 64, m = 0.5)
    CosFace: margin(c) = c - m                              (s = 64, m = 0.35)

Rows are independent given the proxies, so neither needs the global batch: the local row sum is scaled by
`ddp_scale(global batch size)`, as BCT's, and DDP's average is the exact global mean.

Our own code, not a wrapper of pytorch-metric-learning (the tests' value reference): its `ArcFaceLoss`
replaces `cos(theta + m)` by `cos(theta) - m sin(m)` where `theta > pi - m`, which is not the formula of
METHODS 2.1; CosFace alone would be a one-line margin behind PML's machinery (its `(D, C)` weights, its
reducers), and PML is a test dependency, not the library's. ArcFace's margin is an angle in radians (PML's
is in degrees).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dml_core.checks import check_positive
from dml_core.distributed import ddp_scale
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.proxies import ProxyLoss

ARCFACE_M, COSFACE_M, SCALE = 0.5, 0.35, 64.0  # METHODS.md 2.1 defaults


def check_params(s: float, m: float, angular: bool, owner: str = "ArcFace") -> tuple[float, float]:
    """(s, m) checked: s > 0; m >= 0, and an angle below pi when `angular` (ArcFace). The constructors and the
    config loader both use this."""
    s = check_positive(s, "s", owner)
    if not (math.isfinite(m) and m >= 0):
        raise ValueError(f"{owner}: m must be >= 0 and finite, got {m}")
    if angular and m >= math.pi:
        raise ValueError(f"{owner}: m is an angle in radians and must be < pi, got {m}")
    return s, float(m)


class _MarginSoftmax(ProxyLoss):
    """The shared softmax: subclasses give the target logit's `margin` (an angle when `angular`)."""

    angular = False

    def __init__(self, num_classes: int, embedding_dim: int, s: float, m: float, seed: int = 0) -> None:
        super().__init__(num_classes, embedding_dim, seed)
        self.s, self.m = check_params(s, m, self.angular, type(self).__name__)

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        self.check_labels(batch.labels_k)  # the global labels: every rank raises alike
        cos = self.cosines(batch.q)
        target = batch.labels_q[:, None]
        logits = cos.scatter(1, target, self.margin(cos.gather(1, target))) * self.s
        ce = F.cross_entropy(logits, batch.labels_q, reduction="sum")
        self.stats = {"ce": float(ce.detach()) / batch.q.shape[0],
                      "target_cos": float(cos.detach().gather(1, target).mean())}
        return ce * ddp_scale(batch.k.shape[0], batch.world)


class ArcFace(_MarginSoftmax):
    """Additive angular margin. `cos(theta + m)` is computed as `c cos(m) - sin(theta) sin(m)`, the same
    value, with `sin(theta)` floored at the dtype's eps so that the gradient stays finite at `|c| = 1`.
    `stats`: this rank's mean cross entropy `ce` and mean target cosine `target_cos`."""

    angular = True

    def __init__(self, num_classes: int, embedding_dim: int, s: float = SCALE, m: float = ARCFACE_M,
                 seed: int = 0) -> None:
        super().__init__(num_classes, embedding_dim, s, m, seed)

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        c = cos.clamp(-1.0, 1.0)
        eps = torch.finfo(c.dtype).eps
        sin = torch.sqrt((1.0 - c * c).clamp(min=eps * eps))
        return c * math.cos(self.m) - sin * math.sin(self.m)


class CosFace(_MarginSoftmax):
    """Additive cosine margin: the target logit is `s * (cos - m)`. `stats` as ArcFace's."""

    def __init__(self, num_classes: int, embedding_dim: int, s: float = SCALE, m: float = COSFACE_M,
                 seed: int = 0) -> None:
        super().__init__(num_classes, embedding_dim, s, m, seed)

    def margin(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m

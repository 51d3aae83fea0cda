"""Symmetric two-tower CLIP loss (METHODS.md 1.1) against a naive loop."""
from __future__ import annotations

import math

import pytest
import torch

from dml_core.losses.clip import ClipLoss, clip_loss
from tests.dml_core.losses.test_info_nce import RTOL, assert_close_rel

torch.set_num_threads(1)


def naive_clip(z_a, z_b, tau):
    """Mean of the row-wise (a -> b) and column-wise (b -> a) cross entropies, as loops."""
    a = [r / torch.sqrt((r * r).sum()) for r in z_a]
    b = [r / torch.sqrt((r * r).sum()) for r in z_b]
    n = len(a)
    s = [[a[i] @ b[j] / tau for j in range(n)] for i in range(n)]
    rows = [-(s[i][i] - torch.logsumexp(torch.stack([s[i][j] for j in range(n)]), 0)) for i in range(n)]
    cols = [-(s[j][j] - torch.logsumexp(torch.stack([s[i][j] for i in range(n)]), 0)) for j in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2


def value_and_grads(fn, z_a, z_b):
    z_a, z_b = z_a.detach().clone().requires_grad_(True), z_b.detach().clone().requires_grad_(True)
    value = fn(z_a, z_b)
    return (value.detach(), *torch.autograd.grad(value, (z_a, z_b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (9, 4, 0.07), (16, 12, 0.5)])
@pytest.mark.parametrize("use_module", [False, True])
def test_matches_naive(dtype, n, d, tau, use_module):
    g = torch.Generator().manual_seed(n)
    z_a = torch.randn(n, d, generator=g, dtype=dtype)
    z_b = torch.randn(n, d, generator=g, dtype=dtype)
    fn = ClipLoss(tau) if use_module else (lambda a, b: clip_loss(a, b, tau))
    got = value_and_grads(fn, z_a, z_b)
    want = value_and_grads(lambda a, b: naive_clip(a, b, tau), z_a, z_b)
    for x, y in zip(got, want):
        assert_close_rel(x, y, RTOL[dtype])


def test_perfectly_aligned_towers_approach_zero_loss():
    # Orthogonal pairs with a tiny tau: each row's softmax puts all mass on its own pair.
    eye = torch.eye(4, dtype=torch.float64)
    assert float(clip_loss(eye, 3 * eye, tau=0.01)) < 1e-30
    # Identical embeddings for all pairs: every softmax is uniform, loss = log B.
    same = torch.ones(5, 3, dtype=torch.float64)
    assert math.isclose(float(clip_loss(same, same)), math.log(5), rel_tol=1e-12)


@pytest.mark.parametrize("fn", [clip_loss, lambda a, b: ClipLoss()(a, b)], ids=["functional", "module"])
class TestBadInput:
    def test_shape_mismatch(self, fn):
        with pytest.raises(ValueError, match=r"same width: z_a \(4, 3\) vs z_b \(5, 3\)"):
            fn(torch.randn(4, 3), torch.randn(5, 3))

    def test_nan(self, fn):
        z_b = torch.randn(4, 3)
        z_b[1, 0] = float("nan")
        with pytest.raises(ValueError, match=r"z_b has NaN or infinite values in rows \[1\]"):
            fn(torch.randn(4, 3), z_b)

    def test_zero_norm(self, fn):
        z_a = torch.randn(4, 3)
        z_a[3] = 0
        with pytest.raises(ValueError, match=r"z_a has zero-norm rows \[3\]"):
            fn(z_a, torch.randn(4, 3))


def test_bad_tau():
    with pytest.raises(ValueError, match="tau must be > 0"):
        ClipLoss(tau=-1.0)

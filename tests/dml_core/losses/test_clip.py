"""Symmetric two-tower CLIP loss (METHODS.md 1.1) against a naive loop."""
from __future__ import annotations

import math

import pytest
import torch

from dml_core.losses import TCM, ClipLoss, clip_loss
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


def module_fn(loss):
    """A ClipLoss module called on the two-view layout [z_a; z_b] with pair ids as labels."""
    return lambda a, b: loss(torch.cat([a, b]), torch.arange(a.shape[0]).repeat(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (9, 4, 0.07), (16, 12, 0.5)])
@pytest.mark.parametrize("use_module", [False, True])
def test_matches_naive(dtype, n, d, tau, use_module):
    g = torch.Generator().manual_seed(n)
    z_a = torch.randn(n, d, generator=g, dtype=dtype)
    z_b = torch.randn(n, d, generator=g, dtype=dtype)
    fn = module_fn(ClipLoss(tau)) if use_module else (lambda a, b: clip_loss(a, b, tau))
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


class TestBadInput:
    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"same width: z_a \(4, 3\) vs z_b \(5, 3\)"):
            clip_loss(torch.randn(4, 3), torch.randn(5, 3))

    def test_nan(self):
        z_b = torch.randn(4, 3)
        z_b[1, 0] = float("nan")
        with pytest.raises(ValueError, match=r"z_b has NaN or infinite values in rows \[1\]"):
            clip_loss(torch.randn(4, 3), z_b)
        with pytest.raises(ValueError, match=r"z has NaN or infinite values in rows \[5\]"):
            module_fn(ClipLoss())(torch.randn(4, 3), z_b)

    def test_zero_norm(self):
        z_a = torch.randn(4, 3)
        z_a[3] = 0
        with pytest.raises(ValueError, match=r"z_a has zero-norm rows \[3\]"):
            clip_loss(z_a, torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"z has zero-norm rows \[3\]"):
            module_fn(ClipLoss())(z_a, torch.randn(4, 3))

    def test_module_needs_the_pair_layout(self):
        with pytest.raises(ValueError, match="an even number of rows, got 5"):
            ClipLoss()(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="labels of the two rows of a pair differ"):
            ClipLoss()(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        with pytest.raises(ValueError, match="ids of the two rows of a pair differ"):
            ClipLoss()(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([5, 6, 6, 5]))


def test_bad_tau():
    with pytest.raises(ValueError, match="tau must be > 0"):
        ClipLoss(tau=-1.0)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_learnable_logit_scale_matches_naive_value_and_gradients(tau):
    g = torch.Generator().manual_seed(3)
    z_a, z_b = (torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = ClipLoss(tau, learn_scale=True).double()
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(1 / tau))
    scale = loss.logit_scale.detach().clone().requires_grad_()
    got = module_fn(loss)(z_a, z_b)
    got_grads = torch.autograd.grad(got, (z_a, z_b, loss.logit_scale))
    want = naive_clip(z_a, z_b, torch.exp(-scale))
    want_grads = torch.autograd.grad(want, (z_a, z_b, scale))
    assert_close_rel(got.detach(), want.detach(), 1e-12)
    for x, y in zip(got_grads, want_grads):
        assert_close_rel(x, y, 1e-10)
    assert abs(float(got_grads[2])) > 1e-3
    assert loss.stats["logit_scale"] == pytest.approx(1 / tau)


def test_logit_scale_is_clamped_to_open_clip_range():
    loss = ClipLoss(learn_scale=True)
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    module_fn(loss)(torch.randn(4, 3), torch.randn(4, 3))
    assert float(loss.logit_scale.detach()) == pytest.approx(math.log(100))
    assert loss.stats["logit_scale"] == pytest.approx(100)


def test_clip_composes_with_other_terms():
    g = torch.Generator().manual_seed(4)
    z_a, z_b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    pairs = torch.arange(5).repeat(2)
    combined = ClipLoss(0.2) + 0.5 * TCM(m_pos=0.5, m_neg=0.0)
    value = combined(torch.cat([z_a, z_b]), pairs)
    want = clip_loss(z_a, z_b, 0.2) + 0.5 * TCM(m_pos=0.5, m_neg=0.0)(torch.cat([z_a, z_b]), pairs)
    assert float(value) == pytest.approx(float(want), rel=1e-12)
    assert set(combined.stats) >= {"clip/loss", "clip/global_batch", "tcm/loss", "tcm/hard_pos"}

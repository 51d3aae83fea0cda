"""ArcFace and CosFace (METHODS.md 2.1) against pytorch-metric-learning and a loop over rows of the formula:
values and gradients with respect to the embeddings and the proxies."""
from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss

from dml_core.losses import TCM, ArcFace, CosFace
from tests.dml_core.losses._proxies import assert_same, loss_value_and_grads, naive_value_and_grads, proxy_data

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SHAPES = [(6, 4, 3), (20, 8, 5), (33, 16, 12)]  # (batch, dim, classes)


def naive_margin_softmax(z, labels, w, s, margin):
    """METHODS 2.1 row by row: CE(s * [margin(cos_iy) for j = y_i; cos_ij otherwise], y_i), mean over rows."""
    total = 0.0
    for i in range(z.shape[0]):
        zi = z[i] / z[i].norm()
        y = int(labels[i])
        cos = [torch.dot(zi, w[j] / w[j].norm()) for j in range(w.shape[0])]
        logits = torch.stack([s * (margin(c) if j == y else c) for j, c in enumerate(cos)])
        total = total + torch.logsumexp(logits, 0) - logits[y]
    return total / z.shape[0]


def arc(m):
    return lambda c: torch.cos(torch.acos(c) + m)


def cos_margin(m):
    return lambda c: c - m


def target_angles(z, labels, w):
    zn, wn = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(w, dim=1)
    return torch.acos((zn * wn[labels]).sum(1).clamp(-1, 1))


CASES = [  # (ours, PML's, naive margin, s, m)
    (ArcFace, lambda c, d, s, m: ArcFaceLoss(c, d, margin=math.degrees(m), scale=s), arc, 64.0, 0.5),
    (ArcFace, lambda c, d, s, m: ArcFaceLoss(c, d, margin=math.degrees(m), scale=s), arc, 10.0, 0.2),
    (CosFace, lambda c, d, s, m: CosFaceLoss(c, d, margin=m, scale=s), cos_margin, 64.0, 0.35),
    (CosFace, lambda c, d, s, m: CosFaceLoss(c, d, margin=m, scale=s), cos_margin, 5.0, 0.1),
]
IDS = ["arcface", "arcface-s10-m0.2", "cosface", "cosface-s5-m0.1"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ours, pml, margin, s, m", CASES, ids=IDS)
def test_matches_pytorch_metric_learning_and_the_formula(shape, dtype, ours, pml, margin, s, m):
    n, d, c = shape
    z, labels, w = proxy_data(n, d, c, dtype, seed=n)
    assert bool((target_angles(z, labels, w) <= math.pi - m).all())  # where PML's ArcFace is METHODS' formula
    got = loss_value_and_grads(ours(c, d, s=s, m=m), z, labels, w)
    assert_same(got, loss_value_and_grads(pml(c, d, s, m), z, labels, w), RTOL[dtype])
    if dtype == torch.float64:
        assert_same(got, naive_value_and_grads(lambda a, b: naive_margin_softmax(a, labels, b, s, margin(m)), z, w),
                    RTOL[dtype])


def test_arcface_follows_methods_past_pi_minus_m_where_pml_does_not():
    """Beyond theta = pi - m the target logit is still cos(theta + m) (PML switches to cos(theta) - m sin m)."""
    z, labels, w = proxy_data(6, 4, 3, seed=1)
    z[0] = -w[labels[0]] + 0.05 * z[0]  # nearly opposite its proxy
    assert float(target_angles(z, labels, w)[0]) > math.pi - 0.5
    got = loss_value_and_grads(ArcFace(3, 4, s=8.0).double(), z, labels, w)
    want = naive_value_and_grads(lambda a, b: naive_margin_softmax(a, labels, b, 8.0, arc(0.5)), z, w)
    assert_same(got, want, 1e-10)
    pml = loss_value_and_grads(ArcFaceLoss(3, 4, margin=math.degrees(0.5), scale=8.0), z, labels, w)
    assert abs(float(pml[0] - got[0])) > 1e-3


@pytest.mark.parametrize("loss", [ArcFace, CosFace])
def test_gradient_is_finite_when_an_embedding_is_its_proxy(loss):
    z, labels, w = proxy_data(4, 5, 3, torch.float32, seed=2)
    z[0], z[1] = w[labels[0]], -w[labels[1]]  # cos exactly 1 and -1: acos' is infinite there
    value, dz, dw = loss_value_and_grads(loss(3, 5), z, labels, w)
    assert all(bool(torch.isfinite(t).all()) for t in (value, dz, dw))


def test_composes_with_tcm_and_scales_rows_like_a_mean():
    z, labels, w = proxy_data(12, 8, 4, seed=3)
    both = ArcFace(4, 8).double() + TCM()
    value = loss_value_and_grads(both, z, labels, w)[0]
    arcface = naive_margin_softmax(z, labels, w, 64.0, arc(0.5))
    assert float(value) == pytest.approx(float(arcface) + both.stats["tcm/loss"], rel=1e-10)
    assert set(both.stats) >= {"arc_face/loss", "arc_face/ce", "arc_face/target_cos", "tcm/hard_pos"}


def test_defaults_proxies_and_checks():
    assert [(loss(3, 4).s, loss(3, 4).m) for loss in (ArcFace, CosFace)] == [(64.0, 0.5), (64.0, 0.35)]  # METHODS
    assert torch.equal(ArcFace(5, 8, seed=3).proxies, CosFace(5, 8, seed=3).proxies)
    assert not torch.equal(ArcFace(5, 8, seed=3).proxies, ArcFace(5, 8, seed=4).proxies)
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\): \[3\]"):
        ArcFace(3, 4)(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="embeddings of dim 5, proxies of dim 4"):
        CosFace(3, 4)(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="m is an angle in radians and must be < pi"):
        ArcFace(3, 4, m=3.2)
    with pytest.raises(ValueError, match="CosFace: s must be > 0"):
        CosFace(3, 4, s=0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ArcFace(1, 4)

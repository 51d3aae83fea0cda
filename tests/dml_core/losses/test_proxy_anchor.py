"""Proxy-Anchor (METHODS.md 2.1) against pytorch-metric-learning and a loop over proxies of the formula:
values and gradients with respect to the embeddings and the proxies."""
from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss

from dml_core.losses import ProxyAnchor
from tests.dml_core.losses._proxies import assert_same, loss_value_and_grads, naive_value_and_grads, proxy_data

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SHAPES = [(6, 4, 3), (20, 8, 5), (33, 16, 12)]  # (batch, dim, classes)


def naive_proxy_anchor(z, labels, w, alpha=32.0, delta=0.1):
    """METHODS 2.1 proxy by proxy, with plain sums of exponentials."""
    zn = [z[i] / z[i].norm() for i in range(z.shape[0])]
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for p in range(w.shape[0]):
        cos = [torch.dot(zi, w[p] / w[p].norm()) for zi in zn]
        pos = [torch.exp(-alpha * (c - delta)) for c, y in zip(cos, labels) if int(y) == p]
        neg = [torch.exp(alpha * (c + delta)) for c, y in zip(cos, labels) if int(y) != p]
        if pos:
            with_pos += 1
            pos_total = pos_total + torch.log(1 + sum(pos))
        neg_total = neg_total + torch.log(1 + sum(neg))
    return pos_total / with_pos + neg_total / w.shape[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", [{}, dict(alpha=8.0, delta=0.3)], ids=["defaults", "alpha8-delta0.3"])
def test_matches_pytorch_metric_learning_and_the_formula(shape, dtype, params):
    n, d, c = shape
    z, labels, w = proxy_data(n, d, c, dtype, seed=n, missing=1)  # a proxy without positives: |P+| < C
    ours = ProxyAnchor(c, d, **params)
    got = loss_value_and_grads(ours, z, labels, w)
    pml = ProxyAnchorLoss(c, d, margin=params.get("delta", 0.1), alpha=params.get("alpha", 32.0))
    assert_same(got, loss_value_and_grads(pml, z, labels, w), RTOL[dtype])
    if dtype == torch.float64:
        want = naive_value_and_grads(lambda a, b: naive_proxy_anchor(a, labels, b, **params), z, w)
        assert_same(got, want, RTOL[dtype])
    assert ours.stats["proxies_with_positive"] == len(set(labels.tolist())) < c
    assert ours.stats["pos"] + ours.stats["neg"] == pytest.approx(float(got[0]), rel=1e-6)


def test_the_sums_over_the_batch_do_not_split_into_local_batches():
    """Why it needs the gathered batch: the mean of the losses of two halves is not the loss of the whole."""
    z, labels, w = proxy_data(16, 8, 4, seed=5)
    loss = ProxyAnchor(4, 8).double()
    whole = loss_value_and_grads(loss, z, labels, w)[0]
    halves = [loss_value_and_grads(loss, z[part], labels[part], w)[0] for part in (slice(0, 8), slice(8, 16))]
    assert abs(float(sum(halves) / 2 - whole)) > 1e-3 * float(whole)


def test_defaults_and_checks():
    loss = ProxyAnchor(3, 4)
    assert (loss.alpha, loss.delta, tuple(loss.proxies.shape)) == (32.0, 0.1, (3, 4))  # METHODS' defaults
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ProxyAnchor(3, 4, alpha=0)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        ProxyAnchor(3, 4, delta=-0.1)
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\): \[-1\]"):
        loss(torch.randn(2, 4), torch.tensor([0, -1]))

"""TCM (METHODS.md 2) against a loop-by-loop reference and pytorch-metric-learning."""
from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

from dml_core.losses.tcm import TCM, tcm_loss

SHAPES = [(5, 3), (12, 8), (23, 4)]
DTYPES = [torch.float32, torch.float64]


def naive_tcm(z, labels, m_pos=0.9, m_neg=0.5, lambda_pos=1.0, lambda_neg=1.0):
    """Plain loops over ordered pairs i != j; returns (loss, n_hard_pos, n_hard_neg)."""
    n = z.shape[0]
    pos_terms, neg_terms = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            s = torch.dot(z[i], z[j]) / (z[i].norm() * z[j].norm())
            if labels[i] == labels[j] and s <= m_pos:
                pos_terms.append(m_pos - s)
            elif labels[i] != labels[j] and s >= m_neg:
                neg_terms.append(s - m_neg)
    pos = sum(pos_terms) / len(pos_terms) if pos_terms else 0.0
    neg = sum(neg_terms) / len(neg_terms) if neg_terms else 0.0
    return lambda_pos * pos + lambda_neg * neg, len(pos_terms), len(neg_terms)


def _batch(n, d, dtype, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return z, labels


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_()
    value = fn(z)
    value = value[0] if isinstance(value, tuple) else value
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [{}, dict(m_pos=0.6, m_neg=0.1, lambda_pos=0.5, lambda_neg=2.0)])
def test_tcm_loss_matches_naive_values_and_gradients(shape, dtype, params):
    z, labels = _batch(*shape, dtype, seed=shape[0])
    want, want_grad = _value_and_grad(lambda x: naive_tcm(x, labels, **params), z)
    got, got_grad = _value_and_grad(lambda x: tcm_loss(x, labels, **params), z)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tcm_class_matches_functional_and_reports_hard_pair_counts(shape, dtype):
    z, labels = _batch(*shape, dtype, seed=100 + shape[0])
    params = dict(m_pos=0.7, m_neg=0.2, lambda_pos=1.5, lambda_neg=0.5)
    loss = TCM(**params)
    got, got_grad = _value_and_grad(lambda x: loss(x, labels), z)
    want, want_grad = _value_and_grad(lambda x: tcm_loss(x, labels, **params), z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    _, n_pos, n_neg = naive_tcm(z, labels, **params)
    assert loss.stats["hard_pos"] == n_pos and loss.stats["hard_neg"] == n_neg
    # the logged terms are the unweighted means
    naive_pos, _, _ = naive_tcm(z, labels, **{**params, "lambda_pos": 1.0, "lambda_neg": 0.0})
    naive_neg, _, _ = naive_tcm(z, labels, **{**params, "lambda_pos": 0.0, "lambda_neg": 1.0})
    assert loss.stats["tcm_pos"] == pytest.approx(float(naive_pos), rel=1e-5)
    assert loss.stats["tcm_neg"] == pytest.approx(float(naive_neg), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.3, 0.0), (0.8, 0.4)])
def test_tcm_loss_matches_pytorch_metric_learning(seed, margins):
    # PML names: margin_plus = m_pos, margin_minus = m_neg, lambda_plus/minus = lambda_pos/neg. It also
    # uses all ordered pairs i != j of the batch and the same "<= m_pos" / ">= m_neg" hard-pair tests.
    m_pos, m_neg = margins
    z, labels = _batch(16, 5, torch.float64, seed=seed, classes=4)
    pml = ThresholdConsistentMarginLoss(lambda_plus=0.7, lambda_minus=1.3, margin_plus=m_pos, margin_minus=m_neg)
    want, want_grad = _value_and_grad(lambda x: pml(x, labels), z)
    got, got_grad = _value_and_grad(
        lambda x: tcm_loss(x, labels, m_pos=m_pos, m_neg=m_neg, lambda_pos=0.7, lambda_neg=1.3), z)
    torch.testing.assert_close(got, want.to(got.dtype))
    torch.testing.assert_close(got_grad, want_grad)


def test_tcm_loss_accepts_numpy_arrays():
    z, labels = _batch(8, 3, torch.float64, seed=3)
    assert float(tcm_loss(z.numpy(), labels.numpy())) == pytest.approx(float(naive_tcm(z, labels)[0]))


def test_no_hard_pairs_gives_zero_and_backward_works():
    # two tight clusters far apart: every positive is above m_pos and every negative below m_neg
    z = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = TCM()
    value = loss(z, labels)
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert loss.stats["hard_pos"] == 0 and loss.stats["hard_neg"] == 0


def test_single_class_batch_only_has_positive_term():
    z, _ = _batch(6, 3, torch.float64, seed=7)
    labels = torch.zeros(6, dtype=torch.long)
    loss = TCM()
    value = loss(z, labels)
    assert loss.stats["hard_neg"] == 0
    assert float(value) == pytest.approx(float(naive_tcm(z, labels)[0]))


def test_tcm_composes_with_plus():
    z, labels = _batch(10, 4, torch.float64, seed=9)
    combined = TCM() + TCM(m_pos=0.5, m_neg=0.0)
    value = combined(z, labels)
    want = naive_tcm(z, labels)[0] + naive_tcm(z, labels, m_pos=0.5, m_neg=0.0)[0]
    assert float(value) == pytest.approx(float(want))


@pytest.mark.parametrize("z, labels, match", [
    (torch.randn(4, 3), torch.tensor([0, 1, 0]), "one label per row"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]), "NaN"),
    (torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), "zero-norm"),
    (torch.randn(1, 3), torch.tensor([0]), "at least 2"),
    (torch.randn(3), torch.tensor([0, 1, 0]), "2-D"),
])
def test_bad_input_raises_clear_errors(z, labels, match):
    with pytest.raises(ValueError, match=match):
        tcm_loss(z, labels)
    with pytest.raises(ValueError, match=match):
        TCM()(z, labels)


@pytest.mark.parametrize("kwargs, match", [(dict(m_pos=1.5), "m_pos"), (dict(lambda_neg=-1.0), "lambda_neg")])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TCM(**kwargs)


# ---- the tiled path (METHODS 1.3): equal to the dense one, never b x B ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 9, 23])
@pytest.mark.parametrize("margins", [(0.9, 0.5), (0.2, -0.3), (-1.0, 1.0)])
def test_tiled_equals_dense(dtype, n, margins):
    from tests.dml_core.losses.test_decomposable import _value_and_grad

    m_pos, m_neg = margins
    z, labels = _batch(n, 4, dtype, seed=n)
    dense = TCM(m_pos, m_neg, lambda_pos=0.7, lambda_neg=1.3)
    want, want_grad = _value_and_grad(lambda x: dense(x, labels), z)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    for tile_size in (1, 4, n, n + 3):
        tiled = TCM(m_pos, m_neg, lambda_pos=0.7, lambda_neg=1.3, tile_size=tile_size, tiled_above=0)
        got, got_grad = _value_and_grad(lambda x: tiled(x, labels), z)
        assert tiled.stats.pop("tiled") == 1.0 and dense.stats["tiled"] == 0.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
        torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol)
        assert tiled.stats == pytest.approx({k: v for k, v in dense.stats.items() if k != "tiled"}, rel=rtol)
        fn, fn_grad = _value_and_grad(lambda x: tcm_loss(x, labels, m_pos, m_neg, 0.7, 1.3, tile_size, 0), z)
        torch.testing.assert_close(fn, want, rtol=rtol, atol=rtol)
        torch.testing.assert_close(fn_grad, want_grad, rtol=rtol, atol=rtol)


def test_tiled_never_materialises_b_by_b():
    from tests.dml_core.losses.test_tiled import MaxOutputNumel

    n, d, tile_size = 384, 8, 16
    z, labels = _batch(n, d, torch.float32, seed=0, classes=40)
    x = z.clone().requires_grad_()
    with MaxOutputNumel() as mode:
        loss = TCM(m_pos=0.5, m_neg=0.0, tile_size=tile_size, tiled_above=0)(x, labels)
        loss.backward()
        tcm_loss(x, labels, 0.5, 0.0, tile_size=tile_size, tiled_above=0).backward()
    assert float(loss.detach()) > 0 and mode.largest <= max(tile_size * n, n * d)
    with MaxOutputNumel() as mode:
        TCM()(z, labels)
    assert mode.largest >= n * n


def test_bad_tile_size_raises():
    with pytest.raises(ValueError, match="tile_size"):
        TCM(tile_size=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_equals_dense_with_small_classes(dtype):
    # pair ids and a few larger classes: the tiles gather the same-label pairs by index
    from tests.dml_core.losses.test_decomposable import _value_and_grad

    labels = torch.cat([torch.arange(30) // 2, torch.full((6,), 50), torch.tensor([60, 60, 61, 62])])
    z = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    dense = TCM(0.5, 0.0)
    want, want_grad = _value_and_grad(lambda x: dense(x, labels), z)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    tiled = TCM(0.5, 0.0, tile_size=7, tiled_above=0)
    got, got_grad = _value_and_grad(lambda x: tiled(x, labels), z)
    assert dense.stats["hard_pos"] > 0 and dense.stats["hard_neg"] > 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
    torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol)
    assert tiled.stats["hard_pos"] == dense.stats["hard_pos"] and tiled.stats["hard_neg"] == dense.stats["hard_neg"]

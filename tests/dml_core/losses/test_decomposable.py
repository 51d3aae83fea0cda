"""Decomposable contrastive loss (METHODS.md 1.5) against a loop-by-loop stochastic-EM reference."""
from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch

import numpy as np

from dml_core.losses.decomposable import DEFAULT_GAMMA, DecomposableLoss, decomposable_loss
from tests.dml_core.losses.test_tiled import MaxOutputNumel

SHAPES = [(6, 3), (12, 8), (21, 5)]
DTYPES = [torch.float32, torch.float64]


def naive_rows(z, labels, tau):
    """Per anchor: (-mean_p s_ip / tau, Zhat_i = mean over negatives of exp(s_ij / tau)); None if undefined."""
    zn = [z[i] / z[i].norm() for i in range(z.shape[0])]
    out = []
    for i in range(len(zn)):
        pos = [torch.dot(zn[i], zn[j]) for j in range(len(zn)) if j != i and labels[j] == labels[i]]
        neg = [torch.exp(torch.dot(zn[i], zn[j]) / tau) for j in range(len(zn)) if labels[j] != labels[i]]
        pos_term = -sum(pos) / tau / len(pos) if pos else None
        zhat = sum(neg) / len(neg) if neg else None
        out.append((pos_term, zhat))
    return out


def naive_m_step(z, labels, u, tau):
    terms = [p + u[i] * zh for i, (p, zh) in enumerate(naive_rows(z, labels, tau)) if p is not None and zh is not None]
    return sum(terms) / len(terms)


class NaiveEM:
    """Dictionary-based stochastic EM of METHODS 1.5. Duplicates of an id are averaged into one Zhat and one
    update (gamma = 1 on a first visit). order "m_then_e" (the spec): u_i = 1 / zbar_i from the state before
    this batch, or 1 / this batch's Zhat_i on a first visit, then the E-step; "e_then_m": the E-step first."""

    def __init__(self, tau, gamma, order="m_then_e"):
        self.tau, self.gamma, self.order, self.zbar = tau, gamma, order, {}

    def step(self, z, labels, ids):
        rows = naive_rows(z.detach().double(), labels, self.tau)
        groups = defaultdict(list)
        for i, (_, zhat) in enumerate(rows):
            if zhat is not None:
                groups[int(ids[i])].append(float(zhat))
        means = {k: sum(v) / len(v) for k, v in groups.items()}

        def e_step():
            for k, mean in means.items():
                self.zbar[k] = mean if k not in self.zbar else (1 - self.gamma) * self.zbar[k] + self.gamma * mean

        if self.order == "e_then_m":
            e_step()
            used = dict(self.zbar)
        else:
            used = {**means, **self.zbar}  # the state before this batch; this batch's Zhat where none yet
            e_step()
        u = [1.0 / used[int(k)] if int(k) in used else 0.0 for k in ids]
        return naive_m_step(z, labels, u, self.tau)


def _batch(n, d, dtype, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]  # every class has >= 2 items
    return torch.randn(n, d, generator=g, dtype=dtype), labels


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_()
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_functional_m_step_matches_naive(shape, dtype, tau):
    z, labels = _batch(*shape, dtype, seed=shape[0])
    u = torch.rand(shape[0], generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.01 + 1e-3
    want, want_grad = _value_and_grad(lambda x: naive_m_step(x, labels, u, tau), z)
    got, got_grad = _value_and_grad(lambda x: decomposable_loss(x, labels, u, tau=tau), z)
    torch.testing.assert_close(got, want, **_tol(dtype))
    torch.testing.assert_close(got_grad, want_grad, **_tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.9, 0.3])
@pytest.mark.parametrize("order", ["m_then_e", "e_then_m"])
def test_several_em_steps_match_naive_state_value_and_gradient(shape, dtype, gamma, order):
    n, d = shape
    num_samples, tau = 2 * n, 0.1
    loss, ref = DecomposableLoss(num_samples, tau=tau, gamma=gamma, order=order), NaiveEM(tau, gamma, order)
    g = torch.Generator().manual_seed(n)
    for step in range(4):
        z, labels = _batch(n, d, dtype, seed=10 * n + step)
        ids = torch.randint(0, num_samples, (n,), generator=g)  # overlaps and duplicates on purpose
        ids[1] = ids[0]
        want, want_grad = _value_and_grad(lambda x: ref.step(x, labels, ids), z)
        got, got_grad = _value_and_grad(lambda x: loss(x, labels, ids), z)
        torch.testing.assert_close(got, want, **_tol(dtype))
        torch.testing.assert_close(got_grad, want_grad, **_tol(dtype))
        seen = sorted(ref.zbar)
        assert loss.seen.nonzero().flatten().tolist() == seen
        torch.testing.assert_close(loss.zbar[seen], torch.tensor([ref.zbar[k] for k in seen], dtype=torch.float64),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        assert torch.all(loss.zbar[~loss.seen] == 0)


def test_self_supervised_two_views_share_an_id():
    # labels are pair ids, both views of a sample carry its sample id: one averaged E-step update
    z, _ = _batch(8, 4, torch.float64, seed=3)
    pair = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ids = torch.tensor([5, 5, 2, 2, 7, 7, 0, 0])
    loss, ref = DecomposableLoss(8, gamma=0.9), NaiveEM(0.1, 0.9)
    for _ in range(2):
        torch.testing.assert_close(loss(z, pair, ids), ref.step(z, pair, ids))
    rows = naive_rows(z, pair, 0.1)
    assert float(loss.zbar[5]) == pytest.approx(float(rows[0][1] + rows[1][1]) / 2)


def test_first_step_value_is_positive_term_plus_one():
    # gamma = 1 on first visit and u = 1 / zbar = 1 / Zhat, so every u_i * Zhat_i is exactly 1
    z, labels = _batch(10, 4, torch.float64, seed=5)
    value = DecomposableLoss(10)(z, labels, torch.arange(10))
    rows = [p for p, zh in naive_rows(z, labels, 0.1) if p is not None and zh is not None]
    assert float(value) == pytest.approx(float(sum(rows) / len(rows)) + 1.0)


def test_small_tau_stays_finite():
    z, labels = _batch(12, 3, torch.float32, seed=2)
    loss = DecomposableLoss(12, tau=0.005)
    z = z.requires_grad_()
    value = loss(z, labels, torch.arange(12))
    value.backward()
    assert math.isfinite(float(value.detach())) and torch.isfinite(z.grad).all()


def test_sampled_u_is_reproducible_and_unbiased():
    z, labels = _batch(8, 4, torch.float64, seed=4)
    ids = torch.arange(8)
    a, b = (DecomposableLoss(8, gamma=1.0, gamma_shape=2.0, seed=3) for _ in range(2))
    values_a = [float(a(z, labels, ids)) for _ in range(400)]
    values_b = [float(b(z, labels, ids)) for _ in range(400)]
    assert values_a == values_b
    assert len(set(values_a)) > 300  # draws change per step
    # gamma = 1 and fixed z: zbar = Zhat, E[u] = 1 / Zhat, so E[loss] = deterministic loss (u * Zhat = 1)
    det = float(DecomposableLoss(8, gamma=1.0)(z, labels, ids))
    mean = sum(values_a) / len(values_a)
    std_err = (sum((v - mean) ** 2 for v in values_a) / len(values_a)) ** 0.5 / len(values_a) ** 0.5
    assert abs(mean - det) < 5 * std_err


def test_large_gamma_shape_approaches_deterministic():
    z, labels = _batch(8, 4, torch.float64, seed=6)
    ids = torch.arange(8)
    sampled = float(DecomposableLoss(8, gamma_shape=1e8)(z, labels, ids))
    det = float(DecomposableLoss(8)(z, labels, ids))
    assert sampled == pytest.approx(det, rel=1e-3)


@pytest.mark.parametrize("gamma_shape", [None, 2.0])
def test_state_dict_roundtrip_gives_same_next_step(tmp_path, gamma_shape):
    n, num_samples = 10, 16
    loss = DecomposableLoss(num_samples, gamma_shape=gamma_shape, seed=1)
    for step in range(3):
        z, labels = _batch(n, 4, torch.float64, seed=step)
        loss(z, labels, torch.arange(step, step + n))
    torch.save(loss.state_dict(), tmp_path / "loss.pt")
    restored = DecomposableLoss(num_samples, gamma_shape=gamma_shape, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert torch.equal(restored.zbar, loss.zbar) and torch.equal(restored.seen, loss.seen)
    assert restored.zbar.dtype == torch.float64
    z, labels = _batch(n, 4, torch.float64, seed=99)
    ids = torch.arange(4, 4 + n)
    want, want_grad = _value_and_grad(lambda x: copy.deepcopy(loss)(x, labels, ids), z)
    got, got_grad = _value_and_grad(lambda x: restored(x, labels, ids), z)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # and the restored state is not a fresh one: a fresh loss gives a different next step
    fresh = float(DecomposableLoss(num_samples, gamma_shape=gamma_shape, seed=1)(z, labels, ids))
    assert fresh != pytest.approx(float(got))


@pytest.mark.parametrize("ids, match", [
    (None, "needs the stable sample ids"),
    (torch.tensor([0, 1, 2, 10]), r"out of range \[0, 10\): \[10\]"),
    (torch.tensor([0, -1, 2, 3]), "out of range"),
    (torch.tensor([0, 1, 2]), "one id per row"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integers"),
])
def test_bad_ids_raise(ids, match):
    z, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=match):
        DecomposableLoss(10)(z, labels, ids)


@pytest.mark.parametrize("z, labels, match", [
    (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), "both a positive"),
    (torch.randn(4, 3), torch.tensor([0, 0, 0, 0]), "both a positive"),
    (torch.randn(4, 3), torch.tensor([0, 0, 1]), "one label per row"),
    (torch.tensor([[1.0, float("nan")]] * 2 + [[0.0, 1.0]] * 2), torch.tensor([0, 0, 1, 1]), "NaN"),
    (torch.tensor([[0.0, 0.0]] * 2 + [[0.0, 1.0]] * 2), torch.tensor([0, 0, 1, 1]), "zero-norm"),
])
def test_bad_batches_raise(z, labels, match):
    with pytest.raises(ValueError, match=match):
        DecomposableLoss(10)(z, labels, torch.arange(4))
    with pytest.raises(ValueError, match=match):
        decomposable_loss(z, labels, torch.ones(4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples"), (dict(num_samples=4, tau=0.0), "tau"),
    (dict(num_samples=4, gamma=0.0), "gamma"), (dict(num_samples=4, gamma_shape=-1.0), "gamma_shape"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecomposableLoss(**kwargs)


def test_spec_order_uses_the_state_before_the_batch():
    # second visit of the same ids: u = 1 / (Zhat of the FIRST visit), whatever this batch's Zhat is
    z1, labels = _batch(9, 4, torch.float64, seed=11)
    z2, _ = _batch(9, 4, torch.float64, seed=12)
    ids = torch.arange(9)
    loss = DecomposableLoss(9, gamma=0.5)
    loss(z1, labels, ids)
    first = [zh for _, zh in naive_rows(z1, labels, 0.1)]
    got = loss(z2, labels, ids)
    want = naive_m_step(z2, labels, [1.0 / zh for zh in first], 0.1)
    torch.testing.assert_close(got, want)
    second = [zh for _, zh in naive_rows(z2, labels, 0.1)]
    torch.testing.assert_close(loss.zbar, torch.tensor([0.5 * a + 0.5 * b for a, b in zip(first, second)]))
    # the previous order: u from the state updated with this batch
    old = DecomposableLoss(9, gamma=0.5, order="e_then_m")
    old(z1, labels, ids)
    want_old = naive_m_step(z2, labels, [1.0 / (0.5 * a + 0.5 * b) for a, b in zip(first, second)], 0.1)
    torch.testing.assert_close(old(z2, labels, ids), want_old)


def test_default_gamma_is_used():
    assert DecomposableLoss(4).gamma == DEFAULT_GAMMA


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_functional_bad_tau_raises(tau):
    z, labels = _batch(6, 3, torch.float64, seed=1)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        decomposable_loss(z, labels, torch.ones(6), tau=tau)


@pytest.mark.parametrize("u, err, match", [
    (-torch.ones(6), ValueError, r"u must be finite and > 0.*rows \[0, 1, 2, 3, 4\]"),
    (torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]), ValueError, r"u must be finite and > 0.*rows \[2\]"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), ValueError, "finite"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0, 1.0]), ValueError, "finite"),
    (torch.ones(5), ValueError, "one value per row"),
    (torch.ones(6, 1), ValueError, "one value per row"),
    (torch.ones(6, dtype=torch.bool), TypeError, "real numbers"),
    ("abc", TypeError, "u must be a tensor, a NumPy array or a"),
])
def test_functional_bad_u_raises(u, err, match):
    z, labels = _batch(6, 3, torch.float64, seed=1)
    with pytest.raises(err, match=match):
        decomposable_loss(z, labels, u)


def test_functional_accepts_arrays_and_lists():
    z, labels = _batch(8, 3, torch.float64, seed=2)
    u = torch.linspace(0.01, 0.02, 8, dtype=torch.float64)
    want = decomposable_loss(z, labels, u)
    for args in [(z.numpy(), labels.numpy(), u.numpy()), (z.tolist(), labels.tolist(), u.tolist()),
                 (z, labels, u.tolist()), (z, labels, u.float())]:
        got = decomposable_loss(*args)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert decomposable_loss([[1, 0], [1, 1], [0, 1], [-1, 1]], [0, 0, 1, 1], [1, 1, 1, 1]).dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=4, tau=float("nan")), "tau"), (dict(num_samples=4, gamma=1.5), "gamma"),
    (dict(num_samples=4, order="em"), "order"), (dict(num_samples=4, tile_size=0), "tile_size"),
    (dict(num_samples=4, gamma_shape=float("nan")), "gamma_shape"),
])
def test_more_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecomposableLoss(**kwargs)


# ---- the tiled path (METHODS 1.3): equal to the dense one, never b x B ----

def _tiled_batch(n, d, dtype, seed):
    z, labels = _batch(n, d, dtype, seed, classes=4)
    labels[2] = 99  # an anchor without a positive (left out, still a negative of the others)
    return z, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.1, 0.015])
@pytest.mark.parametrize("order", ["m_then_e", "e_then_m"])
@pytest.mark.parametrize("gamma_shape", [None, 2.0])
def test_tiled_equals_dense_over_several_steps(dtype, tau, order, gamma_shape):
    # tau = 0.015 exceeds the float32 no-shift bound, so both exp paths are covered; the embeddings move
    # a little per step (as in training) so that u_i * Zhat_i stays of order 1
    n, d, num_samples = 13, 5, 20
    dense = DecomposableLoss(num_samples, tau=tau, gamma=0.3, order=order, gamma_shape=gamma_shape, seed=4)
    tiled = {t: DecomposableLoss(num_samples, tau=tau, gamma=0.3, order=order, gamma_shape=gamma_shape, seed=4,
                                 tile_size=t, tiled_above=0) for t in (1, 4, 13, 20)}
    g = torch.Generator().manual_seed(3)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    base, labels = _tiled_batch(n, d, dtype, seed=100)
    for step in range(4):
        z = base + 0.05 * torch.randn(n, d, generator=g, dtype=dtype)
        ids = torch.randperm(num_samples, generator=g)[:n]
        ids[5] = ids[4]
        want, want_grad = _value_and_grad(lambda x: dense(x, labels, ids), z)
        assert dense.stats["tiled"] == 0.0
        for loss in tiled.values():
            got, got_grad = _value_and_grad(lambda x: loss(x, labels, ids), z)
            assert loss.stats["tiled"] == 1.0 and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs()))
            torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol * float(want_grad.abs().max()))
            torch.testing.assert_close(loss.zbar, dense.zbar, rtol=rtol, atol=0)
            assert torch.equal(loss.seen, dense.seen) and int(loss.step) == int(dense.step)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_tiled_equals_dense(dtype):
    z, labels = _tiled_batch(11, 4, dtype, seed=8)
    u = torch.rand(11, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.01 + 1e-3
    want, want_grad = _value_and_grad(lambda x: decomposable_loss(x, labels, u), z)
    got, got_grad = _value_and_grad(lambda x: decomposable_loss(x, labels, u, tile_size=3, tiled_above=0), z)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol * float(want_grad.abs().max()))


def test_tiled_never_materialises_b_by_b():
    n, d, tile_size = 384, 8, 16
    z, labels = _batch(n, d, torch.float32, seed=0, classes=60)
    ids = torch.arange(n)
    loss = DecomposableLoss(n, tile_size=tile_size, tiled_above=0)
    loss(z, labels, ids)  # first visit
    for _ in range(2):
        x = z.clone().requires_grad_()
        with MaxOutputNumel() as mode:
            loss(x, labels, ids).backward()
        assert mode.largest <= max(tile_size * n, n * d)
    x = z.clone().requires_grad_()
    with MaxOutputNumel() as mode:
        decomposable_loss(x, labels, torch.ones(n), tile_size=tile_size, tiled_above=0).backward()
    assert mode.largest <= max(tile_size * n, n * d)
    with MaxOutputNumel() as mode:  # the detector sees the dense path's n x n
        DecomposableLoss(n)(z, labels, ids)
    assert mode.largest >= n * n


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_equals_dense_with_small_classes(dtype):
    # pair ids (two views per item) and a few larger classes: the tiles gather the same-label pairs by index
    n, d, num_samples = 40, 6, 40
    labels = torch.cat([torch.arange(30) // 2, torch.full((6,), 50), torch.tensor([60, 60, 61, 62])])
    g = torch.Generator().manual_seed(9)
    base = torch.randn(n, d, generator=g, dtype=dtype)
    dense = DecomposableLoss(num_samples, gamma=0.3)
    tiled = DecomposableLoss(num_samples, gamma=0.3, tile_size=7, tiled_above=0)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    for step in range(3):
        z = base + 0.05 * torch.randn(n, d, generator=g, dtype=dtype)
        ids = torch.randperm(num_samples, generator=g)
        want, want_grad = _value_and_grad(lambda x: dense(x, labels, ids), z)
        got, got_grad = _value_and_grad(lambda x: tiled(x, labels, ids), z)
        assert tiled.stats["single_pass"] == float(step > 0)  # every id seen after the first step
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs()))
        torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=rtol * float(want_grad.abs().max()))
        torch.testing.assert_close(tiled.zbar, dense.zbar, rtol=rtol, atol=0)
        assert tiled.stats == pytest.approx({**dense.stats, "tiled": 1.0, "single_pass": float(step > 0)}, rel=rtol)

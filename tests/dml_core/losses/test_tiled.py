"""Tiled InfoNCE rows (METHODS.md 1.3): exact against the dense path and a naive loop, never B x B."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dml_core.losses.info_nce import dense_info_nce_rows
from dml_core.losses.tiled import tiled_info_nce_rows, tiled_info_nce_sum
from tests.dml_core.losses.test_info_nce import RTOL, assert_close_rel, naive_info_nce_rows

torch.set_num_threads(1)


def make_inputs(n_keys, n_anchors, offset, d, n_classes, dtype, seed, device="cpu"):
    """Separate leaves for anchors and keys (as on one rank of a distributed run), with singletons."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(n_keys, d, generator=g, dtype=dtype), dim=1)
    labels_k = torch.randint(0, n_classes, (n_keys,), generator=g)
    labels_k[offset] = 10_000  # the first anchor has no positive
    labels_k[-1] = 10_001  # a key no one matches
    q = k[offset: offset + n_anchors].clone()
    weights = torch.randn(n_anchors, generator=g, dtype=torch.float64)
    return (q.to(device).requires_grad_(True), k.to(device).requires_grad_(True),
            labels_k[offset: offset + n_anchors].to(device), labels_k.to(device), weights.to(device))


def rows_and_grads(fn, q, k, weights):
    rows = fn(q, k)
    grad_q, grad_k = torch.autograd.grad((rows * weights.to(rows.dtype)).sum(), (q, k))
    return rows.detach(), grad_q, grad_k


SHAPES = [(12, 12, 0, 4, 3), (23, 7, 9, 5, 4), (40, 40, 0, 16, 12), (31, 10, 21, 8, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.1, 0.01])
@pytest.mark.parametrize("n_keys,n_anchors,offset,d,n_classes", SHAPES)
def test_tiled_equals_dense(dtype, tau, n_keys, n_anchors, offset, d, n_classes):
    # tau = 0.01 exceeds the no-shift limit in float32, so both exp paths are covered.
    q, k, labels_q, labels_k, w = make_inputs(n_keys, n_anchors, offset, d, n_classes, dtype, seed=n_keys)
    dense = rows_and_grads(lambda a, b: dense_info_nce_rows(a, b, labels_q, labels_k, offset, tau), q, k, w)
    assert dense[0][0] == 0  # the anchor without a positive
    for tile_size in sorted({1, 3, 7, n_anchors, n_anchors + 5}):
        tiled = rows_and_grads(
            lambda a, b: tiled_info_nce_rows(a, b, labels_q, labels_k, offset, tau, tile_size), q, k, w)
        for got, want in zip(tiled, dense):
            assert got.dtype == want.dtype
            assert_close_rel(got, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.1, 0.01])
@pytest.mark.parametrize("n_keys,n_anchors,offset,d,n_classes", SHAPES)
def test_tiled_sum_equals_scaled_dense_sum(dtype, tau, n_keys, n_anchors, offset, d, n_classes):
    # The gradients are made in forward and scaled by the upstream gradient in backward.
    q, k, labels_q, labels_k, _ = make_inputs(n_keys, n_anchors, offset, d, n_classes, dtype, seed=n_keys + 1)
    scale, upstream = 2.5, 0.3

    def value_and_grads(fn):
        value = fn(q, k)
        return (value.detach(), *torch.autograd.grad(value * upstream, (q, k)))

    dense = value_and_grads(lambda a, b: dense_info_nce_rows(a, b, labels_q, labels_k, offset, tau).sum() * scale)
    for tile_size in sorted({1, 4, n_anchors, n_anchors + 3}):
        tiled = value_and_grads(
            lambda a, b: tiled_info_nce_sum(a, b, labels_q, labels_k, offset, tau, tile_size, scale))
        for got, want in zip(tiled, dense):
            assert got.dtype == want.dtype
            assert_close_rel(got, want, RTOL[dtype])
    # Only one input needing a gradient, and no gradient at all (forward skips the gradient work).
    (grad_q,) = torch.autograd.grad(tiled_info_nce_sum(q, k.detach(), labels_q, labels_k, offset, tau, 3, scale)
                                    * upstream, q)
    assert_close_rel(grad_q, dense[1], RTOL[dtype])
    with torch.no_grad():
        assert_close_rel(tiled_info_nce_sum(q, k, labels_q, labels_k, offset, tau, 3, scale), dense[0], RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_equals_naive_loop(dtype):
    n, d, tau, tile_size = 15, 6, 0.1, 4
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, 5, (n,), generator=g)
    labels[3] = 77
    w = torch.randn(n, generator=g, dtype=dtype)

    def tiled(x):
        zn = F.normalize(x, dim=1)
        return (tiled_info_nce_rows(zn, zn, labels, labels, 0, tau, tile_size) * w).sum()

    def naive(x):
        rows = naive_info_nce_rows(x, labels, tau)
        return sum(r * w[i] for i, r in enumerate(rows) if r is not None)

    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a, b = tiled(z1), naive(z2)
    a.backward()
    b.backward()
    assert_close_rel(a.detach(), b.detach(), RTOL[dtype])
    assert_close_rel(z1.grad, z2.grad, RTOL[dtype])


def test_unnormalised_rows_stay_finite_and_exact():
    # Rows of norm 4 with tau = 0.1: logits up to 160 would overflow an unshifted float32 exp.
    q, k, labels_q, labels_k, w = make_inputs(30, 30, 0, 6, 5, torch.float32, seed=5)
    q4, k4 = (4 * q).detach().requires_grad_(True), (4 * k).detach().requires_grad_(True)
    dense = rows_and_grads(lambda a, b: dense_info_nce_rows(a, b, labels_q, labels_k, 0, 0.1), q4, k4, w)
    tiled = rows_and_grads(lambda a, b: tiled_info_nce_rows(a, b, labels_q, labels_k, 0, 0.1, 7), q4, k4, w)
    for got, want in zip(tiled, dense):
        assert torch.isfinite(got).all()
        assert_close_rel(got, want, 1e-5)


def test_keys_without_grad():
    q, k, labels_q, labels_k, w = make_inputs(20, 8, 4, 5, 4, torch.float64, seed=6)
    k = k.detach()
    rows = tiled_info_nce_rows(q, k, labels_q, labels_k, 4, 0.1, 3)
    (grad_q,) = torch.autograd.grad((rows * w).sum(), q)
    want = dense_info_nce_rows(q, k, labels_q, labels_k, 4, 0.1)
    (want_q,) = torch.autograd.grad((want * w).sum(), q)
    assert_close_rel(grad_q, want_q, 1e-10)


class MaxOutputNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_b_by_b():
    n, d, tile_size = 512, 8, 16
    q, k, labels_q, labels_k, w = make_inputs(n, n, 0, d, 100, torch.float32, seed=0)
    with MaxOutputNumel() as mode:
        rows = tiled_info_nce_rows(q, k, labels_q, labels_k, 0, 0.1, tile_size)
        (rows * w.float()).sum().backward()
        tiled_info_nce_sum(q, k, labels_q, labels_k, 0, 0.1, tile_size).backward()
    assert mode.largest <= max(tile_size * n, n * d)
    with MaxOutputNumel() as mode:  # the detector itself works
        dense_info_nce_rows(q, k, labels_q, labels_k, 0, 0.1)
    assert mode.largest >= n * n


def test_saves_only_linear_memory_for_backward():
    n, d = 256, 8
    q, k, labels_q, labels_k, _ = make_inputs(n, n, 0, d, 50, torch.float32, seed=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        tiled_info_nce_rows(q, k, labels_q, labels_k, 0, 0.1, 32)
        tiled_info_nce_sum(q, k, labels_q, labels_k, 0, 0.1, 32)
    assert saved and max(saved) <= n * d


def test_bf16_inputs_and_autocast_compute_in_float32():
    q, k, labels_q, labels_k, w = make_inputs(64, 64, 0, 16, 8, torch.float32, seed=2)
    qb, kb = q.detach().bfloat16().requires_grad_(True), k.detach().bfloat16().requires_grad_(True)
    q32, k32 = qb.detach().float().requires_grad_(True), kb.detach().float().requires_grad_(True)
    want = rows_and_grads(lambda a, b: dense_info_nce_rows(a, b, labels_q, labels_k, 0, 0.1), q32, k32, w)
    got = rows_and_grads(lambda a, b: tiled_info_nce_rows(a, b, labels_q, labels_k, 0, 0.1, 5), qb, kb, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    (sum_grad_q,) = torch.autograd.grad(tiled_info_nce_sum(qb, kb.detach(), labels_q, labels_k, 0, 0.1, 5), qb)
    (want_sum_q,) = torch.autograd.grad(dense_info_nce_rows(q32, k32.detach(), labels_q, labels_k, 0, 0.1).sum(), q32)
    assert sum_grad_q.dtype == torch.bfloat16
    assert_close_rel(sum_grad_q.float(), want_sum_q, 1e-2)
    assert_close_rel(got[0], want[0], 1e-5)
    for g, ref in zip(got[1:], want[1:]):  # gradients are rounded to bf16 on the way out
        assert_close_rel(g.float(), ref, 1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = rows_and_grads(
            lambda a, b: tiled_info_nce_rows(a, b, labels_q, labels_k, 0, 0.1, 5), q32, k32, w)
    for g, ref in zip(under_autocast, want):
        assert g.dtype == torch.float32
        assert_close_rel(g, ref, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_equals_dense_on_cuda(dtype):
    q, k, labels_q, labels_k, w = make_inputs(300, 100, 150, 32, 40, dtype, seed=3, device="cuda")
    dense = rows_and_grads(lambda a, b: dense_info_nce_rows(a, b, labels_q, labels_k, 150, 0.1), q, k, w)
    tiled = rows_and_grads(lambda a, b: tiled_info_nce_rows(a, b, labels_q, labels_k, 150, 0.1, 33), q, k, w)
    for got, want in zip(tiled, dense):
        assert got.is_cuda
        assert_close_rel(got, want, RTOL[dtype])
    value = tiled_info_nce_sum(q, k, labels_q, labels_k, 150, 0.1, 33)
    want_value = dense_info_nce_rows(q, k, labels_q, labels_k, 150, 0.1).sum()
    for got, want in zip((value, *torch.autograd.grad(value, (q, k))), (want_value, *torch.autograd.grad(want_value, (q, k)))):
        assert_close_rel(got, want, RTOL[dtype])


def test_bad_arguments():
    q, k, labels_q, labels_k, _ = make_inputs(10, 4, 0, 3, 3, torch.float32, seed=4)
    with pytest.raises(ValueError, match="do not fit inside keys"):
        tiled_info_nce_rows(q, k, labels_q, labels_k, offset=8)
    with pytest.raises(ValueError, match="3 anchor labels for 4 anchors"):
        tiled_info_nce_rows(q, k, labels_q[:3], labels_k)
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        tiled_info_nce_rows(q, k, labels_q, labels_k, tile_size=0)
    with pytest.raises(ValueError, match="do not fit inside keys"):
        tiled_info_nce_sum(q, k, labels_q, labels_k, offset=8)

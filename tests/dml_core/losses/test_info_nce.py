"""Supervised InfoNCE (METHODS.md 1.1 / 7) against a naive loop, pytorch-metric-learning and NT-Xent."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dml_core.losses.info_nce import InfoNCE, info_nce_loss

torch.set_num_threads(1)


def naive_info_nce_rows(z, labels, tau, anchors=None):
    """METHODS.md 1.1 written as loops: one scalar per anchor (None where the anchor has no positive)."""
    zn = [row / torch.sqrt((row * row).sum()) for row in z]
    labels = labels.tolist()
    out = []
    for i in anchors if anchors is not None else range(len(zn)):
        others = [j for j in range(len(zn)) if j != i]
        log_denominator = torch.logsumexp(torch.stack([zn[i] @ zn[a] / tau for a in others]), dim=0)
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            out.append(None)
            continue
        terms = [zn[i] @ zn[p] / tau - log_denominator for p in positives]
        out.append(-sum(terms) / len(positives))
    return out


def naive_info_nce(z, labels, tau):
    rows = [r for r in naive_info_nce_rows(z, labels, tau) if r is not None]
    return sum(rows) / len(rows)


def assert_close_rel(actual, expected, rtol):
    """Relative to the largest magnitude of `expected` (elementwise relative error is meaningless near 0)."""
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {float(err):.3g} > {rtol} * {float(scale):.3g}"


RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def random_batch(n, d, n_classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, n_classes, (n,), generator=g)


CASES = [(6, 3, 2, 0.1), (13, 8, 4, 0.1), (24, 16, 10, 0.5), (20, 5, 6, 0.05)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,n_classes,tau", CASES)
def test_functional_matches_naive(dtype, n, d, n_classes, tau):
    z, labels = random_batch(n, d, n_classes, dtype, seed=n * d)
    value, grad = value_and_grad(lambda x: info_nce_loss(x, labels, tau), z)
    ref_value, ref_grad = value_and_grad(lambda x: naive_info_nce(x, labels, tau), z)
    assert value.dtype == dtype
    assert_close_rel(value, ref_value, RTOL[dtype])
    assert_close_rel(grad, ref_grad, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiled_above", [10**9, 0])
def test_module_single_process_matches_naive(dtype, tiled_above):
    z, labels = random_batch(17, 6, 5, dtype, seed=3)
    labels[16] = 99  # an anchor without a positive
    loss = InfoNCE(tau=0.2, tile_size=4, tiled_above=tiled_above)
    value, grad = value_and_grad(lambda x: loss(x, labels), z)
    ref_value, ref_grad = value_and_grad(lambda x: naive_info_nce(x, labels, 0.2), z)
    assert_close_rel(value, ref_value, RTOL[dtype])
    assert_close_rel(grad, ref_grad, RTOL[dtype])
    n_valid = sum(r is not None for r in naive_info_nce_rows(z, labels, 0.2))
    assert loss.stats["anchors_with_positive"] == n_valid == 16
    assert loss.stats["tiled"] == float(tiled_above == 0)


def test_matches_pytorch_metric_learning_supcon():
    # PML's SupConLoss (v2.x): CosineSimilarity normalises z; per anchor -mean over positives of
    # log softmax, the softmax over all other items (positives + negatives, self excluded) -- the same
    # as METHODS 1.1. Anchors without positives get loss 0 and its AvgNonZeroReducer averages over the
    # losses > 0 only, i.e. our "mean over anchors with a positive" as long as every anchor with a positive
    # has a loss > 0, which holds when it has at least one other candidate (B >= 3). PML returns 0 for a
    # batch without any negative pair, so every batch here has >= 2 labels and singletons on purpose.
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    for seed, (n, d, n_classes, tau) in enumerate(CASES):
        z, labels = random_batch(n, d, n_classes, torch.float64, seed=seed)
        labels[0] = 1000 + seed  # a singleton anchor: no positive
        assert len(set(labels.tolist())) >= 2
        pml = losses.SupConLoss(temperature=tau)
        value, grad = value_and_grad(lambda x: info_nce_loss(x, labels, tau), z)
        ref_value, ref_grad = value_and_grad(lambda x: pml(x, labels), z)
        assert_close_rel(value, ref_value, 1e-10)
        assert_close_rel(grad, ref_grad, 1e-9)


def test_two_view_pair_ids_equal_nt_xent():
    # Self-supervised two-view mode: labels = pair ids. The standard NT-Xent (SimCLR) form is a cross
    # entropy over the 2N x 2N logits with self masked and the other view as target.
    n, d, tau = 7, 5, 0.1
    g = torch.Generator().manual_seed(1)
    views = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    pair_ids = torch.arange(n).repeat(2)

    def nt_xent(z):
        zn = F.normalize(z, dim=1)
        logits = (zn @ zn.t() / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return F.cross_entropy(logits, target)

    value, grad = value_and_grad(lambda x: info_nce_loss(x, pair_ids, tau), views)
    ref_value, ref_grad = value_and_grad(nt_xent, views)
    assert_close_rel(value, ref_value, 1e-12)
    assert_close_rel(grad, ref_grad, 1e-12)


@pytest.mark.parametrize("fn", [info_nce_loss, lambda z, y: InfoNCE()(z, y)], ids=["functional", "module"])
class TestBadInput:
    def test_label_count_mismatch(self, fn):
        with pytest.raises(ValueError, match=r"labels must be a 1-D tensor with one label per row of z.*\(5,\) for 6"):
            fn(torch.randn(6, 3), torch.zeros(5, dtype=torch.long))

    def test_not_a_matrix(self, fn):
        with pytest.raises(ValueError, match=r"z must be a 2-D \(N, D\) matrix.*\(6, 3, 1\)"):
            fn(torch.randn(6, 3, 1), torch.zeros(6, dtype=torch.long))

    def test_no_positive_pair(self, fn):
        with pytest.raises(ValueError, match="no anchor in the batch of 5 has a positive"):
            fn(torch.randn(5, 3), torch.arange(5))

    def test_nan(self, fn):
        z = torch.randn(6, 3)
        z[4, 1] = float("nan")
        with pytest.raises(ValueError, match=r"z has NaN or infinite values in rows \[4\]"):
            fn(z, torch.zeros(6, dtype=torch.long))

    def test_zero_norm(self, fn):
        z = torch.randn(6, 3)
        z[2] = 0
        with pytest.raises(ValueError, match=r"z has zero-norm rows \[2\].*cannot L2-normalise"):
            fn(z, torch.zeros(6, dtype=torch.long))


def test_bad_parameters():
    with pytest.raises(ValueError, match="tau must be > 0"):
        InfoNCE(tau=0)
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        InfoNCE(tile_size=0)


# ---- issue 10, section 3: the functional form tiles like the class, takes arrays and checks its parameters ----

def test_functional_tiled_equals_dense():
    z, labels = random_batch(37, 6, 7, torch.float64, seed=5)
    labels[36] = 99  # an anchor without a positive
    dense_value, dense_grad = value_and_grad(lambda x: info_nce_loss(x, labels, 0.2, tiled_above=10**9), z)
    for tile_size in (1, 4, 37, 100):
        value, grad = value_and_grad(lambda x: info_nce_loss(x, labels, 0.2, tile_size=tile_size, tiled_above=0), z)
        assert_close_rel(value, dense_value, 1e-12)
        assert_close_rel(grad, dense_grad, 1e-12)
    ref_value, _ = value_and_grad(lambda x: naive_info_nce(x, labels, 0.2), z)
    assert_close_rel(dense_value, ref_value, 1e-12)


def test_functional_tiles_above_the_threshold_and_never_builds_b_by_b():
    from tests.dml_core.losses.test_tiled import MaxOutputNumel

    n, d, tile_size = 512, 8, 16
    z, labels = random_batch(n, d, 100, torch.float32, seed=0)
    z.requires_grad_(True)
    with MaxOutputNumel() as mode:
        info_nce_loss(z, labels, tile_size=tile_size, tiled_above=n - 1).backward()
    assert mode.largest <= max(tile_size * n, n * d)
    with MaxOutputNumel() as mode:  # at the threshold itself the dense path runs (and the detector sees it)
        info_nce_loss(z, labels, tile_size=tile_size, tiled_above=n).backward()
    assert mode.largest >= n * n
    # the same default threshold as the class
    import inspect
    assert inspect.signature(info_nce_loss).parameters["tiled_above"].default == InfoNCE().tiled_above == 8192
    assert inspect.signature(info_nce_loss).parameters["tile_size"].default == InfoNCE().tile_size


def test_functional_takes_numpy_arrays_and_lists():
    z, labels = random_batch(12, 4, 3, torch.float64, seed=2)
    want = info_nce_loss(z, labels, 0.3)
    from_numpy = info_nce_loss(z.numpy(), labels.numpy().astype("int32"), 0.3)
    assert from_numpy.dtype == torch.float64 and float(from_numpy) == pytest.approx(float(want), rel=1e-12)
    from_lists = info_nce_loss(z.tolist(), labels.tolist(), 0.3)
    assert float(from_lists) == pytest.approx(float(want), rel=1e-5)  # a list of floats becomes float32
    tiled = info_nce_loss(z.numpy(), labels.numpy(), 0.3, tiled_above=0)
    assert float(tiled) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(TypeError, match="z must be a torch.Tensor, NumPy array or list"):
        info_nce_loss("not embeddings", labels)


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, float("nan"), float("inf")])
def test_functional_rejects_bad_tau(tau):
    z, labels = random_batch(8, 3, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="info_nce_loss: tau must be > 0"):
        info_nce_loss(z, labels, tau=tau)


def test_functional_rejects_bad_tiling_parameters():
    z, labels = random_batch(8, 3, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        info_nce_loss(z, labels, tile_size=0)
    with pytest.raises(ValueError, match="tiled_above must be >= 0"):
        info_nce_loss(z, labels, tiled_above=-1)
    with pytest.raises(TypeError, match="tau must be a real number"):
        info_nce_loss(z, labels, tau="0.1")
    with pytest.raises(TypeError, match="tile_size must be an integer"):
        info_nce_loss(z, labels, tile_size=2.5)
    with pytest.raises(ValueError, match="InfoNCE: tiled_above must be >= 0"):
        InfoNCE(tiled_above=-1)

"""BCT influence term and old-model class prototypes (METHODS.md 3) against loop references."""
from __future__ import annotations

import pytest
import torch

from dml_core.losses.bct import BCT, class_prototypes, prototype_sums, prototypes_from_sums

SHAPES = [(5, 3, 2), (12, 8, 4), (20, 6, 7)]  # (batch, dim, classes)
DTYPES = [torch.float32, torch.float64]


def naive_prototypes(old, labels, num_classes):
    rows = []
    for c in range(num_classes):
        members = [old[i] / old[i].norm() for i in range(old.shape[0]) if labels[i] == c]
        mean = sum(members) / len(members)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def naive_bct(z, labels, w_old, lambda_bct=1.0, tau_bct=0.05):
    total = 0.0
    for i in range(z.shape[0]):
        zi = z[i] / z[i].norm()
        logits = [torch.dot(w_old[c], zi) / tau_bct for c in range(w_old.shape[0])]
        log_norm = torch.log(sum(torch.exp(l) for l in logits))
        total = total + (log_norm - logits[int(labels[i])])
    return lambda_bct * total / z.shape[0]


def _data(n, d, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    old = torch.randn(3 * n, d, generator=g, dtype=dtype)
    old_labels = torch.arange(3 * n) % c
    return torch.randn(n, d, generator=g, dtype=dtype), labels, old, old_labels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_prototypes_match_naive(shape, dtype):
    n, d, c = shape
    _, _, old, old_labels = _data(n, d, c, dtype, seed=n)
    got = class_prototypes(old, old_labels, c)
    torch.testing.assert_close(got, naive_prototypes(old, old_labels, c))
    torch.testing.assert_close(got.norm(dim=1), torch.ones(c, dtype=dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [{}, dict(lambda_bct=0.3, tau_bct=0.5)])
def test_bct_matches_naive_values_and_gradients(shape, dtype, params):
    n, d, c = shape
    z, labels, old, old_labels = _data(n, d, c, dtype, seed=10 + n)
    w_old = class_prototypes(old, old_labels, c)
    loss = BCT(w_old, **params)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = loss(z1, labels), naive_bct(z2, labels, w_old, **params)
    got.backward()
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.detach(), want.detach(), **tol)
    torch.testing.assert_close(z1.grad, z2.grad, **tol)
    assert loss.stats["bct_ce"] == pytest.approx(float(want.detach()) / params.get("lambda_bct", 1.0), rel=1e-5)


def test_old_weights_are_a_frozen_buffer():
    w_old = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    loss = BCT(w_old)
    assert list(loss.parameters()) == []
    assert torch.equal(loss.state_dict()["old_weights"], w_old)
    w_old.add_(1.0)  # the caller's tensor is copied, not aliased
    assert not torch.equal(loss.old_weights, w_old)
    z = torch.randn(6, 4, requires_grad=True)
    loss(z, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert loss.old_weights.grad is None and z.grad is not None


def test_unnormalised_classifier_rows_are_used_as_given():
    w_old = torch.randn(4, 5, dtype=torch.float64) * 3
    z, labels = torch.randn(8, 5, dtype=torch.float64), torch.arange(8) % 4
    assert float(BCT(w_old)(z, labels)) == pytest.approx(float(naive_bct(z, labels, w_old)))


def test_dimension_mismatch_is_a_clear_error():
    loss = BCT(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"new model embeds in D=4, old model in D=8; BCT needs equal dims"):
        loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 3, 0]), torch.tensor([0, -1, 2, 0])])
def test_labels_outside_the_old_classes_raise(labels):
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\)"):
        BCT(torch.randn(3, 4))(torch.randn(4, 4), labels)


@pytest.mark.parametrize("z, labels, match", [
    (torch.randn(4, 4), torch.tensor([0, 1, 2]), "one label per row"),
    (torch.tensor([[float("nan"), 0, 0, 1.0]] + [[1.0, 0, 0, 0]] * 3), torch.tensor([0, 1, 2, 0]), "NaN"),
    (torch.zeros(4, 4), torch.tensor([0, 1, 2, 0]), "zero-norm"),
])
def test_bad_batches_raise(z, labels, match):
    with pytest.raises(ValueError, match=match):
        BCT(torch.randn(3, 4))(z, labels)


def test_empty_class_is_an_error_unless_allowed():
    old, old_labels = torch.randn(6, 3), torch.tensor([0, 0, 2, 2, 0, 2])
    with pytest.raises(ValueError, match=r"classes \[1\].*no samples"):
        class_prototypes(old, old_labels, 3)
    protos = class_prototypes(old, old_labels, 3, allow_empty=True)
    assert torch.equal(protos[1], torch.zeros(3))
    torch.testing.assert_close(protos[0], naive_prototypes(old[old_labels == 0], torch.zeros(3), 1)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prototypes_from_summed_parts_equal_the_whole(dtype):
    # what the training loop does across workers: per-rank sums and counts, all-reduced, then normalised
    _, _, old, old_labels = _data(12, 5, 4, dtype, seed=3)
    parts = [prototype_sums(old[i::3], old_labels[i::3], 6) for i in range(3)]
    sums, counts = (sum(p[j] for p in parts) for j in range(2))
    assert sums.dtype == counts.dtype == torch.float64 and counts.tolist() == [9, 9, 9, 9, 0, 0]
    protos = prototypes_from_sums(sums, counts, allow_empty=True)
    assert protos.dtype == torch.float64
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(protos[:4], class_prototypes(old, old_labels, 4).double(), **tol)
    assert torch.equal(protos[4:], torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"classes \[4, 5\].*no samples"):
        prototypes_from_sums(sums, counts)


def test_prototype_labels_out_of_range_raise():
    with pytest.raises(ValueError, match="out of range"):
        class_prototypes(torch.randn(4, 3), torch.tensor([0, 1, 5, 0]), 3)


@pytest.mark.parametrize("kwargs, match", [(dict(tau_bct=0.0), "tau_bct"), (dict(lambda_bct=-1.0), "lambda_bct")])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BCT(torch.randn(3, 4), **kwargs)

"""Positive-congruent distillation (METHODS.md 3.1) against a naive float64 loop, its focal weights, and the
two sources of old embeddings (a precomputed table by id, the old model on the batch) giving one loss."""
from __future__ import annotations

import math

import pytest
import torch

from dml_core.losses import BCT, TCM, InfoNCE
from dml_core.losses.bct import class_prototypes
from dml_core.losses.pc import OldEmbeddingTable, OldModelEmbeddings, PositiveCongruent

SHAPES = [(6, 3, 2), (12, 8, 4), (20, 6, 7)]  # (batch, dim, classes)
DTYPES = [torch.float32, torch.float64]


def naive_pc(z, z_old, labels, w_old, lambda_pc=1.0, alpha=1.0, beta=5.0, tau_pc=0.05):
    """METHODS 3.1 written out: a loop over samples and classes, float64."""
    total = 0.0
    for i in range(z.shape[0]):
        zn, on = z[i].double() / z[i].double().norm(), z_old[i].double() / z_old[i].double().norm()
        new_logits = [torch.dot(w_old[c].double(), zn) / tau_pc for c in range(w_old.shape[0])]
        old_logits = [float(torch.dot(w_old[c].double(), on)) / tau_pc for c in range(w_old.shape[0])]
        new_norm = torch.log(sum(torch.exp(l) for l in new_logits))
        old_norm = math.log(sum(math.exp(l) for l in old_logits))
        kl = 0.0
        for c in range(w_old.shape[0]):
            p_old = math.exp(old_logits[c] - old_norm)
            kl = kl + p_old * ((old_logits[c] - old_norm) - (new_logits[c] - new_norm))
        right = max(range(w_old.shape[0]), key=lambda c: old_logits[c]) == int(labels[i])
        total = total + (alpha + beta * right) * kl
    return lambda_pc * total / z.shape[0]


def _data(n, d, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    w_old = class_prototypes(torch.randn(3 * c, d, generator=g, dtype=dtype), torch.arange(3 * c) % c, c)
    # old embeddings near their class prototype for about half the samples: the old model is right on those
    z_old = torch.randn(n, d, generator=g, dtype=dtype) + 2.0 * w_old[labels] * (torch.arange(n) % 2)[:, None]
    ids = torch.randperm(3 * n, generator=g)[:n]
    return torch.randn(n, d, generator=g, dtype=dtype), z_old, labels, w_old, ids


def _table(z_old, ids):
    return OldEmbeddingTable(z_old, ids, num_ids=int(ids.max()) + 5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [{}, dict(lambda_pc=0.3, alpha=0.0, beta=2.0, tau_pc=0.5),
                                    dict(alpha=0.7, beta=0.0, tau_pc=0.2)])
def test_pc_matches_naive_values_and_gradients(shape, dtype, params):
    n, d, c = shape
    z, z_old, labels, w_old, ids = _data(n, d, c, dtype, seed=10 + n)
    loss = PositiveCongruent(w_old, _table(z_old, ids), **params)
    z1, z2 = z.clone().requires_grad_(), z.double().requires_grad_()
    got, want = loss(z1, labels, ids), naive_pc(z2, z_old.double(), labels, w_old.double(), **params)
    got.backward()
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.detach().double(), want.detach(), **tol)
    torch.testing.assert_close(z1.grad.double(), z2.grad, **tol)
    assert float(z2.grad.abs().max()) > 1e-4  # the reference is not trivially zero


def _old_right(z_old, labels, w_old, tau_pc=0.05):
    return (torch.nn.functional.normalize(z_old, dim=1) @ w_old.T / tau_pc).argmax(1) == labels


def test_focal_weight_is_alpha_plus_beta_exactly_where_the_old_model_is_right():
    z, z_old, labels, w_old, ids = _data(20, 6, 4, torch.float64, seed=3)
    right = _old_right(z_old, labels, w_old)
    assert 0 < int(right.sum()) < 20  # both kinds of sample are present
    table = _table(z_old, ids)
    plain = PositiveCongruent(w_old, table, alpha=1.0, beta=0.0)
    rows = []
    for i in range(20):  # each sample's unweighted KL, alone
        rows.append(float(plain(z[i:i + 1], labels[i:i + 1], ids[i:i + 1])))
    rows = torch.tensor(rows, dtype=torch.float64)
    alpha, beta = 0.4, 3.0
    weighted = float(PositiveCongruent(w_old, table, alpha=alpha, beta=beta)(z, labels, ids))
    assert weighted == pytest.approx(float(((alpha + beta * right.double()) * rows).mean()), rel=1e-12)
    assert PositiveCongruent(w_old, table)(z, labels, ids) is not None
    # alpha = 0 ignores the samples the old model gets wrong: changing them leaves loss and gradient alone
    focal = PositiveCongruent(w_old, table, alpha=0.0, beta=beta)
    z1 = z.clone().requires_grad_()
    value = focal(z1, labels, ids)
    value.backward()
    assert float(value.detach()) == pytest.approx(float((beta * right.double() * rows).mean()), rel=1e-12)
    assert torch.equal(z1.grad[~right], torch.zeros_like(z1.grad[~right]))
    assert bool((z1.grad[right].abs().sum(1) > 0).all())
    z2 = z.clone()
    z2[~right] = torch.randn(int((~right).sum()), 6, dtype=torch.float64)
    assert float(focal(z2, labels, ids)) == pytest.approx(float(value.detach()), rel=1e-12)
    assert focal.stats["old_right"] == pytest.approx(float(right.double().mean()))


def test_pc_is_zero_when_the_new_model_equals_the_old_one():
    z, z_old, labels, w_old, ids = _data(12, 8, 4, torch.float64, seed=4)
    loss = PositiveCongruent(w_old, _table(z_old, ids))
    assert float(loss(3.0 * z_old, labels, ids)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(z, labels, ids)) > 1e-3


def test_pc_composes_with_infonce_tcm_and_bct():
    z, z_old, labels, w_old, ids = _data(12, 8, 4, torch.float64, seed=5)
    parts = [InfoNCE(tau=0.2), TCM(m_pos=0.5, m_neg=0.0), BCT(w_old), PositiveCongruent(w_old, _table(z_old, ids))]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    assert float(total(z, labels, ids)) == pytest.approx(sum(float(p(z, labels, ids)) for p in parts), rel=1e-12)
    assert {"positive_congruent/loss", "positive_congruent/pc_kl", "positive_congruent/old_right"} <= set(total.stats)
    # the old embeddings are not the loss's state (checkpoints stay small); the prototypes are, as BCT's
    assert list(parts[3].state_dict()) == ["old_weights"] and list(parts[3].parameters()) == []


def test_precomputed_and_on_the_fly_old_embeddings_give_the_same_loss():
    from dml_core.models.registry import build_model

    torch.manual_seed(0)
    old = build_model("small_cnn", embedding_dim=8, image_size=12, widths=[4, 8])
    images, labels = torch.randn(30, 1, 12, 12), torch.arange(30) % 5
    ids = torch.randperm(40)[:30]
    w_old = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    z = torch.randn(30, 8)
    on_the_fly = OldModelEmbeddings(old)
    with torch.no_grad():  # the precomputed table: every sample once, in other batches than training's
        table = OldEmbeddingTable(torch.cat([old(images[i:i + 7]) for i in range(0, 30, 7)]), ids, num_ids=40)
    for rows in (slice(0, 10), slice(10, 30)):
        on_the_fly.observe(images[rows], ids[rows])
        a = PositiveCongruent(w_old, on_the_fly)(z[rows], labels[rows], ids[rows])
        b = PositiveCongruent(w_old, table)(z[rows], labels[rows], ids[rows])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert float(a) > 1e-3
    assert not old.training and all(not p.requires_grad for p in old.parameters())


def test_bad_input_raises_clear_errors():
    z, z_old, labels, w_old, ids = _data(12, 8, 4, torch.float32, seed=6)
    loss = PositiveCongruent(w_old, _table(z_old, ids))
    with pytest.raises(ValueError, match=r"new model embeds in D=4, old model in D=8; PC needs equal dims"):
        loss(z[:, :4], labels, ids)
    with pytest.raises(ValueError, match="needs sample ids"):
        loss(z, labels)
    with pytest.raises(ValueError, match=r"no precomputed old embedding for sample ids \[1000\]"):
        loss(z[:1], labels[:1], torch.tensor([1000]))
    missing = int(torch.tensor([i for i in range(int(ids.max())) if i not in ids.tolist()][0]))
    with pytest.raises(ValueError, match=rf"no precomputed old embedding for sample ids \[{missing}\]"):
        loss(z[:1], labels[:1], torch.tensor([missing]))
    with pytest.raises(ValueError, match=r"labels out of range \[0, 4\).*PC needs one old prototype"):
        loss(z[:2], torch.tensor([0, 4]), ids[:2])
    narrow = PositiveCongruent(w_old, _table(z_old[:, :4], ids))
    with pytest.raises(ValueError, match="old model's embedding dim to equal"):
        narrow(z, labels, ids)
    with pytest.raises(ValueError, match="did not embed this batch"):
        PositiveCongruent(w_old, OldModelEmbeddings(torch.nn.Identity()))(z, labels, ids)


@pytest.mark.parametrize("kwargs, match", [(dict(tau_pc=0.0), "tau_pc"), (dict(lambda_pc=-1.0), "lambda_pc"),
                                           (dict(alpha=-0.1), "alpha"), (dict(beta=-1.0), "beta"),
                                           (dict(alpha=0.0, beta=0.0), "both 0")])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PositiveCongruent(torch.randn(3, 4), OldEmbeddingTable(torch.randn(2, 4), torch.tensor([0, 1])), **kwargs)

"""Composing losses: named, weighted terms on one batch; `DistributedLoss` saves the inner loss's state;
the batch's masks are built once and the tiled path never builds a pair mask."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dml_core.losses import (BCT, TCM, ClipLoss, CombinedLoss, DecomposableLoss, DistributedLoss, EmbeddingBatch,
                             EmbeddingLoss, InfoNCE, info_nce_loss, tcm_loss)


def _batch(n=12, d=4, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(n) % classes, torch.arange(n)


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_()
    value = fn(z)
    return value.detach(), torch.autograd.grad(value, z)[0]


def test_default_names_and_two_tcms_keep_separate_stats():
    z, labels, _ = _batch()
    tight, loose = dict(m_pos=0.9, m_neg=0.5), dict(m_pos=0.3, m_neg=0.0)
    loss = InfoNCE() + TCM(**tight) + TCM(**loose)
    assert loss.names == ["info_nce", "tcm", "tcm_2"]
    loss(z, labels)
    for name, params in (("tcm", tight), ("tcm_2", loose)):
        alone = TCM(**params)
        value = alone(z, labels)
        assert loss.stats[f"{name}/loss"] == pytest.approx(float(value), rel=1e-12)
        for key in ("hard_pos", "hard_neg", "tcm_pos", "tcm_neg"):
            assert loss.stats[f"{name}/{key}"] == alone.stats[key]
    assert loss.stats["tcm/hard_pos"] != loss.stats["tcm_2/hard_pos"]
    assert loss.stats["info_nce/anchors_with_positive"] == 12.0


def test_names_of_every_loss():
    w_old = torch.eye(3, 4)
    loss = DecomposableLoss(4) + BCT(w_old) + ClipLoss() + InfoNCE() + TCM()
    assert loss.names == ["decomposable", "bct", "clip", "info_nce", "tcm"]


def test_explicit_names():
    loss = CombinedLoss({"tcm_a": TCM(), "tcm_b": 0.5 * TCM(m_pos=0.3)})
    assert loss.names == ["tcm_a", "tcm_b"] and loss.weights == [1.0, 0.5]
    assert (CombinedLoss({"tcm": TCM()}) + TCM()).names == ["tcm", "tcm_2"]
    assert (TCM() + CombinedLoss({"tcm": TCM()})).names == ["tcm_2", "tcm"]
    nested = CombinedLoss({"base": InfoNCE() + TCM(), "reg": TCM()})
    assert nested.names == ["base", "reg"]
    z, labels, _ = _batch()
    nested(z, labels)
    assert {"base/loss", "base/info_nce/loss", "base/tcm/hard_pos", "reg/hard_pos"} <= set(nested.stats)
    with pytest.raises(ValueError, match="duplicate term names"):
        CombinedLoss({"x": TCM()}) + CombinedLoss({"x": InfoNCE()})
    with pytest.raises(ValueError, match="2 weights for 1 terms"):
        CombinedLoss([TCM()], weights=[1.0, 2.0])


@pytest.mark.parametrize("make", [
    lambda: InfoNCE(0.2) + 0.5 * TCM(m_pos=0.5, m_neg=0.0),
    lambda: InfoNCE(0.2) + TCM(m_pos=0.5, m_neg=0.0) * 0.5,
    lambda: 0.5 * (2.0 * InfoNCE(0.2) + TCM(m_pos=0.5, m_neg=0.0)),
], ids=["left", "right", "nested"])
def test_weights_scale_values_and_gradients(make):
    z, labels, _ = _batch(seed=1)
    loss = make()
    assert loss.weights == [1.0, 0.5]
    got = _value_and_grad(lambda x: loss(x, labels), z)
    want = _value_and_grad(lambda x: info_nce_loss(x, labels, 0.2) + 0.5 * tcm_loss(x, labels, 0.5, 0.0), z)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the logged term value is the term's own, unweighted
    assert loss.stats["tcm/loss"] == pytest.approx(float(tcm_loss(z, labels, 0.5, 0.0)), rel=1e-12)


def test_a_term_must_implement_compute():
    class Forgot(EmbeddingLoss):
        pass

    with pytest.raises(NotImplementedError, match="Forgot must implement compute"):
        (InfoNCE() + Forgot())(*_batch()[:2])


def test_state_dict_keys_are_stable_and_the_wrapper_saves_the_inner_ones(tmp_path):
    z, labels, ids = _batch()
    inner = DecomposableLoss(20) + TCM()
    wrapped = DistributedLoss(inner)
    wrapped(z, labels, ids)  # no process group: the local path
    assert list(wrapped.state_dict()) == list(inner.state_dict()) == ["terms.0.zbar", "terms.0.seen", "terms.0.step"]
    assert wrapped.stats is inner.stats and "decomposable/anchors" in wrapped.stats
    torch.save(wrapped.state_dict(), tmp_path / "loss.pt")
    bare = DecomposableLoss(20) + TCM()
    bare.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert torch.equal(bare.terms[0].zbar, inner.terms[0].zbar)
    again = DistributedLoss(DecomposableLoss(20) + TCM())
    again.load_state_dict(bare.state_dict())
    assert torch.equal(again.loss.terms[0].zbar, inner.terms[0].zbar)
    # inside a parent module the wrapper is transparent too
    parent = nn.ModuleDict({"loss": wrapped})
    other = nn.ModuleDict({"loss": DistributedLoss(DecomposableLoss(20) + TCM())})
    assert list(parent.state_dict()) == ["loss.terms.0.zbar", "loss.terms.0.seen", "loss.terms.0.step"]
    other.load_state_dict(parent.state_dict())
    assert torch.equal(other["loss"].loss.terms[0].zbar, inner.terms[0].zbar)


def test_distributed_loss_without_a_group_is_the_loss_itself():
    z, labels, _ = _batch(seed=2)
    got = _value_and_grad(lambda x: DistributedLoss(InfoNCE() + TCM())(x, labels), z)
    want = _value_and_grad(lambda x: (InfoNCE() + TCM())(x, labels), z)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_batch_counts_match_the_masks():
    z, labels, ids = _batch(n=10, classes=4)
    labels[0] = 99  # a singleton
    batch = EmbeddingBatch.local(z, labels, ids)
    assert torch.equal(batch.n_pos_q, batch.positive.sum(1))
    assert torch.equal(batch.has_pos_k, batch.positive.any(1))
    assert torch.equal(batch.has_neg_k, (~batch.same).any(1))
    assert batch.k is batch.q and batch.world == 1 and batch.offset == 0


def test_tiled_info_nce_builds_no_pair_mask():
    z, labels, _ = _batch(n=20)
    batch = EmbeddingBatch.local(z, labels)
    InfoNCE(tiled_above=0).compute(batch)
    assert not {"same", "not_self", "positive"} & set(vars(batch))
    InfoNCE().compute(batch)  # the dense path asks for them once
    assert {"same", "not_self", "positive"} <= set(vars(batch))


def test_bad_ids_raise_clear_errors():
    z, labels, _ = _batch(n=4)
    with pytest.raises(ValueError, match="one id per row"):
        InfoNCE()(z, labels, torch.arange(3))
    with pytest.raises(ValueError, match="integers"):
        InfoNCE()(z, labels, torch.zeros(4))

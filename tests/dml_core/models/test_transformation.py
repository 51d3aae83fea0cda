"""The FCT transformation and its losses (METHODS 6.1): against the formulas, and h trained on synthetic data
where the new space is a fixed linear map of the old one recovers that map; with FastFill's uncertainty, the
items h maps worst get the largest predicted log-variance."""
import math

import pytest
import torch
import torch.nn.functional as F

from dml_core.losses.transformation import transformation_loss
from dml_core.config import TransformationSection
from dml_core.models.transformation import load_transformation
from dml_core.training.loop import Worker
from dml_core.training.transformation import TransformationData, fit_transformation


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    pred, new, s = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    protos, labels = torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    point = ((pred - new) ** 2).sum(1)
    assert transformation_loss(pred, new) == pytest.approx(float(point.mean()), rel=1e-6)
    assert transformation_loss(pred, new, s) == pytest.approx(float((0.5 * torch.exp(-s) * point + 0.5 * s).mean()),
                                                               rel=1e-6)
    logits = F.normalize(pred, dim=1) @ F.normalize(protos, dim=1).T / 0.1
    ce = torch.stack([-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(6)])
    want = (0.5 * torch.exp(-s) * (point + 2.0 * ce) + 0.5 * s).mean()
    got = transformation_loss(pred, new, s, prototypes=protos, labels=labels, lambda_c=2.0, tau_c=0.1)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="tau_c"):
        transformation_loss(pred, new, s, tau_c=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        transformation_loss(pred, new[:, :3])


def _fit(old, new, side=None, uncertainty=False, steps=600, tmp=None):
    """h trained by the library's loop (`fit_transformation`: Adam, cosine schedule, as FCT trains h)."""
    t = TransformationSection(branch_width=64, trunk_width=128, uncertainty=uncertainty, steps=steps, batch_size=256,
                              lr=3e-3, lambda_c=0.0, checkpoint_every=steps)
    labels = torch.zeros(len(old), dtype=torch.int64)
    result = fit_transformation(t, TransformationData(old, new, labels, side), str(tmp), Worker())
    return load_transformation(result["checkpoint"]), result


def test_h_recovers_a_fixed_linear_map(tmp_path):
    torch.manual_seed(0)
    old, a = torch.randn(2048, 16), torch.randn(16, 24) / 4
    new = old @ a
    h, result = _fit(old, new, tmp=tmp_path)
    with torch.no_grad():
        mse = float(((h(old)[0] - new) ** 2).sum(1).mean())
        assert result["mse"] == pytest.approx(mse, rel=1e-4)  # the loop's report: h in eval mode, all of the data
        held_out = torch.randn(256, 16)
        mse_held_out = float(((h(held_out)[0] - held_out @ a) ** 2).sum(1).mean())
    baseline = float(new.pow(2).sum(1).mean())  # predicting 0
    assert mse < 0.02 * baseline and mse_held_out < 0.05 * baseline, (mse, mse_held_out, baseline)
    z = h.transform(old[:4])
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5) and h.training is False


def test_side_info_carries_what_the_old_embedding_lacks_and_uncertainty_ranks_the_errors(tmp_path):
    torch.manual_seed(1)
    old, side = torch.randn(512, 8), torch.randn(512, 4)
    new = torch.cat([old, side], dim=1)  # the new space needs both
    noisy = torch.arange(512) % 4 == 0  # a quarter of the items: new embedding not predictable at all
    new = torch.where(noisy[:, None], 3 * torch.randn(512, 12), new)
    without = _fit(old, new, uncertainty=True, tmp=tmp_path / "without")[0]
    with_side = _fit(old, new, side, uncertainty=True, tmp=tmp_path / "with")[0]
    with torch.no_grad():
        clean = ~noisy
        err = {name: float(((h.eval()(old, s)[0] - new) ** 2).sum(1)[clean].mean())
               for name, h, s in (("without", without, None), ("with", with_side, side))}
        log_var = with_side(old, side)[1]
    assert err["with"] < 0.5 * err["without"], err
    assert float(log_var[noisy].mean()) > float(log_var[~noisy].mean()) + math.log(4)  # e^s tracks the error
    with pytest.raises(ValueError, match="side-info"):
        without(old, side)

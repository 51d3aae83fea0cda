import pytest
import torch
from torch import nn

from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.norm import FrozenBatchNorm2d
from dml_core.models.small_cnn import SmallCNN
from tests.dml_core.models.model_checks import assert_grads_reach_all_parameters, assert_unit_embeddings


def _model(in_channels=1, norm="batch", dim=16):
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=in_channels, widths=(8, 16, 32), norm=norm)
    return EmbeddingModel(backbone, ProjectionHead(backbone.feature_dim, dim))


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32), (1, 20), (2, 4)])
def test_shape_and_unit_norm(in_channels, size):
    model = _model(in_channels)
    z = model(torch.randn(3, in_channels, size, size))
    assert_unit_embeddings(z, 3, 16, torch.float32, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "frozen_batch", "group", "none"])
def test_gradients_reach_all_parameters(norm):
    assert_grads_reach_all_parameters(_model(norm=norm), torch.randn(4, 1, 28, 28))


@pytest.mark.parametrize("norm, layer", [("batch", nn.BatchNorm2d), ("frozen_batch", FrozenBatchNorm2d),
                                         ("group", nn.GroupNorm), ("none", nn.Identity)])
def test_norm_option_picks_the_layers(norm, layer):
    backbone = SmallCNN(widths=(8, 16), norm=norm)
    assert backbone.norm == norm
    layers = list(backbone.features)
    assert [type(layers[i + 1]) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)] == [layer] * 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) or norm == "batch"


def test_float64_matches_float32():
    model = _model().eval()
    x = torch.randn(3, 1, 28, 28)
    z32 = model(x)
    z64 = model.double()(x.double())
    assert_unit_embeddings(z64, 3, 16, torch.float64, atol=1e-12)
    torch.testing.assert_close(z64.float(), z32, atol=1e-5, rtol=1e-4)


def test_feature_dim_is_last_width():
    assert SmallCNN(widths=(4, 8, 24)).feature_dim == 24
    assert SmallCNN(widths=(4, 8, 24))(torch.randn(2, 1, 28, 28)).shape == (2, 24)


def test_bad_inputs_are_named():
    model = SmallCNN(in_channels=1, widths=(4, 8, 16))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="minimum of 4 px"):
        model(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(1, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="norm"):
        SmallCNN(norm="layer")


def naive_supcon_infonce(z, labels, tau):
    """Per anchor i: minus the mean over its positives p of log(exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau))."""
    losses = []
    for i in range(z.shape[0]):
        others = torch.arange(z.shape[0]) != i
        positives = others & (labels == labels[i])
        if positives.any():
            s = z[i] @ z.T / tau
            losses.append(-(s[positives] - torch.logsumexp(s[others], dim=0)).mean())
    return torch.stack(losses).mean()


def _clustered_batch(prototypes, per_class, generator):
    labels = torch.arange(prototypes.shape[0]).repeat_interleave(per_class)
    noise = torch.randn(labels.shape[0], *prototypes.shape[1:], generator=generator)
    return prototypes[labels] + noise, labels


def _loss_and_nn_accuracy(model, x, labels):
    model.eval()
    with torch.no_grad():
        z = model(x)
    model.train()
    sim = z @ z.T - 3 * torch.eye(len(z))
    return naive_supcon_infonce(z, labels, tau=0.2).item(), (labels[sim.argmax(1)] == labels).float().mean().item()


def test_small_cnn_learns_clusters_with_contrastive_loss():
    """Noisy copies of 4 random 28x28 prototypes (noise as strong as the signal): 60 Adam steps of
    supervised InfoNCE must lower the held-out loss and make held-out nearest neighbours same-class."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 1, 28, 28, generator=g)
    x_eval, y_eval = _clustered_batch(prototypes, 8, g)
    model = _model(dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_before, acc_before = _loss_and_nn_accuracy(model, x_eval, y_eval)
    for _ in range(60):
        x, y = _clustered_batch(prototypes, 8, g)
        loss = naive_supcon_infonce(model(x), y, tau=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss_after, acc_after = _loss_and_nn_accuracy(model, x_eval, y_eval)
    assert loss_after < loss_before - 0.8, (loss_before, loss_after)
    assert acc_after >= 0.9 and acc_after >= acc_before + 0.3, (acc_before, acc_after)

import pytest
import torch
from torch import nn

from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.small_cnn import SmallCNN


def _unit_rows(x):
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def test_linear_head_is_normalised_affine_map():
    torch.manual_seed(0)
    head = ProjectionHead(12, 5, kind="linear")
    f = torch.randn(4, 12)
    expected = _unit_rows(f @ head.proj.weight.T + head.proj.bias)
    torch.testing.assert_close(head(f), expected)


def test_mlp_head_is_normalised_two_layer_relu_mlp():
    torch.manual_seed(0)
    head = ProjectionHead(12, 5, kind="mlp", hidden_dim=7)
    first, last = head.proj[0], head.proj[2]
    assert first.weight.shape == (7, 12) and last.weight.shape == (5, 7)
    f = torch.randn(4, 12)
    hidden = torch.clamp(f @ first.weight.T + first.bias, min=0)
    torch.testing.assert_close(head(f), _unit_rows(hidden @ last.weight.T + last.bias))


def test_embedding_model_composes_backbone_and_head():
    torch.manual_seed(0)
    backbone = SmallCNN(widths=(4, 8))
    head = ProjectionHead(backbone.feature_dim, 6, kind="linear")
    model = EmbeddingModel(backbone, head).eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), head(backbone(x)))
    assert model.embedding_dim == 6 and model.feature_dim == 8


def test_mismatched_dims_are_named():
    with pytest.raises(ValueError, match="feature_dim=8 does not match head in_dim=9"):
        EmbeddingModel(SmallCNN(widths=(4, 8)), ProjectionHead(9, 4))
    with pytest.raises(ValueError, match=r"expects \(N, 9\) features"):
        ProjectionHead(9, 4)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="'mlp' or 'linear'"):
        ProjectionHead(9, 4, kind="conv")


def test_backbone_without_feature_dim_attribute_is_accepted():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    model = EmbeddingModel(backbone, ProjectionHead(10, 3))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)

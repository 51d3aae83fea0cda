import pytest
import torch
from torch import nn

from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.norm import FrozenBatchNorm2d
from dml_core.models.resnet import BasicBlock, Bottleneck, ResNet, resnet, resnet18, resnet50
from tests.dml_core.models.model_checks import (assert_grads_reach_all_parameters, assert_unit_embeddings,
                                                count_parameters)

# Parameter counts with the 1000-class ImageNet classifier, from the torchvision model docs.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_count_matches_torchvision(depth):
    assert count_parameters(resnet(depth, in_channels=3, num_classes=1000)) == TORCHVISION_PARAMS[depth]


@pytest.mark.parametrize("build,block,widths", [
    (resnet18, BasicBlock, [64, 128, 256, 512]),
    (resnet50, Bottleneck, [256, 512, 1024, 2048]),
])
def test_standard_stem_stage_shapes_on_224px(build, block, widths):
    """He et al. Table 1: conv2_x..conv5_x outputs are 56, 28, 14, 7 px for a 224 px input."""
    torch.manual_seed(0)
    model = build(in_channels=3).eval()
    shapes = []
    for stage in model.stages:
        assert all(isinstance(b, block) for b in stage)
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert shapes == [(w, s, s) for w, s in zip(widths, [56, 28, 14, 7])]
    assert feats.shape == (1, widths[-1]) and model.feature_dim == widths[-1]


def test_small_input_stem_keeps_resolution():
    model = resnet18(in_channels=1, small_input=True).eval()
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:])))
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert shapes == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem)


def _embedder(depth, in_channels, small_input, dim=16):
    torch.manual_seed(0)
    backbone = resnet(depth, in_channels=in_channels, small_input=small_input)
    return EmbeddingModel(backbone, ProjectionHead(backbone.feature_dim, dim, kind="linear"))


@pytest.mark.parametrize("depth,in_channels,size,small_input", [
    (18, 1, 28, True), (18, 3, 32, True), (18, 3, 64, False), (50, 1, 16, True), (50, 3, 64, False),
])
def test_shape_and_unit_norm(depth, in_channels, size, small_input):
    model = _embedder(depth, in_channels, small_input)
    with torch.no_grad():
        z = model(torch.randn(2, in_channels, size, size))
    assert_unit_embeddings(z, 2, 16, torch.float32, atol=1e-5)


@pytest.mark.parametrize("depth,in_channels,size,small_input", [
    (18, 1, 28, True), (50, 1, 16, True), (50, 3, 32, False),
])
def test_gradients_reach_all_parameters(depth, in_channels, size, small_input):
    assert_grads_reach_all_parameters(_embedder(depth, in_channels, small_input),
                                      torch.randn(2, in_channels, size, size))


@pytest.mark.parametrize("depth", [18, 50])
def test_float64_matches_float32(depth):
    model = _embedder(depth, 1, True).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        z32 = model(x)
        z64 = model.double()(x.double())
    assert_unit_embeddings(z64, 2, 16, torch.float64, atol=1e-12)
    torch.testing.assert_close(z64.float(), z32, atol=1e-4, rtol=1e-3)


def test_bad_input_and_depth():
    with pytest.raises(ValueError, match="in_channels=3"):
        resnet18(in_channels=3)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet(20)


@pytest.mark.parametrize("norm, layer", [("batch", nn.BatchNorm2d), ("frozen_batch", FrozenBatchNorm2d),
                                         ("group", nn.GroupNorm)])
def test_norm_option_replaces_every_normalisation_layer(norm, layer):
    model = resnet(18, in_channels=3, num_classes=1000, norm=norm)
    assert model.norm == norm
    assert count_parameters(model) == TORCHVISION_PARAMS[18]  # same affine parameters whatever the norm
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm))]
    assert len(norms) == 20 and all(type(m) is layer for m in norms)  # stem, 2 per block x 8, 3 shortcuts
    if norm == "group":
        assert {m.num_groups for m in norms} == {32}


@pytest.mark.parametrize("norm", ["frozen_batch", "group"])
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_per_sample_norms_train_every_parameter_and_ignore_the_batch(norm, block):
    torch.manual_seed(0)
    backbone = ResNet(block, (1, 1), in_channels=1, small_input=True, widths=(8, 16), norm=norm)
    model = EmbeddingModel(backbone, ProjectionHead(backbone.feature_dim, 8, kind="linear")).double().train()
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    assert_grads_reach_all_parameters(model, x)
    with torch.no_grad():  # per-sample: in training mode, a sample's embedding does not depend on the others
        torch.testing.assert_close(torch.cat([model(c) for c in x.split(1)]), model(x), rtol=1e-12, atol=1e-12)


def test_bad_norm_is_named():
    with pytest.raises(ValueError, match="norm must be one of"):
        resnet(18, norm="layer")

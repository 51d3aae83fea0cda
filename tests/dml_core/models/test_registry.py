import importlib.util

import pytest
import torch
from torch import nn

from dml_core.models.head import EmbeddingModel
from dml_core.models.registry import BACKBONES, build_backbone, build_model, known_models
from dml_core.models.resnet import ResNet
from dml_core.models.small_cnn import SmallCNN
from dml_core.models.vit import ViT
from tests.dml_core.models.model_checks import assert_unit_embeddings

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None
FAST_NAMES = ["small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small"]


@pytest.mark.parametrize("name", FAST_NAMES)
def test_built_models_give_unit_embeddings_on_28px(name):
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=24)
    assert isinstance(model, EmbeddingModel) and model.embedding_dim == 24
    with torch.no_grad():
        z = model(torch.randn(2, 1, 28, 28))
    assert_unit_embeddings(z, 2, 24, torch.float32, atol=1e-5)


@pytest.mark.parametrize("name", FAST_NAMES)
def test_bf16_autocast_on_cpu(name):
    """Mixed precision must run without dtype-specific code and stay close to the float32 result."""
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=16, in_channels=3, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = model(x)
    assert z16.shape == (2, 16) and torch.isfinite(z16).all()
    assert torch.allclose(z16.float().norm(dim=1), torch.ones(2), atol=2e-2)
    assert (z16.float() * z32).sum(dim=1).min() > 0.97


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAST_NAMES)
def test_bf16_autocast_on_cuda(name):
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=16, in_channels=3, image_size=32).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = model(x)
    z.float().sum().backward()
    assert z.shape == (4, 16) and torch.isfinite(z).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_backbone_kinds_and_arguments_are_passed_through():
    assert isinstance(build_backbone("small_cnn", widths=(4, 8)), SmallCNN)
    small = build_backbone("resnet18", image_size=28)
    big = build_backbone("resnet18", in_channels=3, image_size=224)
    assert isinstance(small, ResNet) and not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert any(isinstance(m, nn.MaxPool2d) for m in big.stem)
    assert any(isinstance(m, nn.MaxPool2d) for m in build_backbone("resnet18", small_input=False).stem)
    v = build_backbone("vit_tiny", image_size=32, in_channels=3, depth=2)
    assert isinstance(v, ViT) and len(v.blocks) == 2 and v.patch_size == 4 and v.feature_dim == 192
    assert build_backbone("resnet50").feature_dim == 2048


def test_spec_records_the_build_arguments():
    model = build_model("small_cnn", embedding_dim=8, in_channels=3, image_size=32, head="linear", widths=(4, 8))
    assert model.spec == {"name": "small_cnn", "embedding_dim": 8, "in_channels": 3, "image_size": 32,
                          "head": "linear", "head_hidden_dim": None, "kwargs": {"widths": (4, 8), "norm": "batch"}}


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("norm", ["batch", "frozen_batch", "group"])
def test_norm_option_of_the_conv_backbones_is_recorded(name, norm):
    model = build_model(name, embedding_dim=4, norm=norm)
    assert model.backbone.norm == norm and model.spec["kwargs"]["norm"] == norm


def test_vit_has_no_norm_option():
    assert "norm" not in build_model("vit_tiny", embedding_dim=4, depth=1).spec["kwargs"]
    with pytest.raises(TypeError, match="norm"):
        build_model("vit_tiny", depth=1, norm="group")


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as err:
        build_model("resnet19")
    message = str(err.value)
    assert "resnet19" in message
    for name in list(BACKBONES) + ["torchvision:<name>", "timm:<name>"]:
        assert name in message
    assert set(BACKBONES) <= set(known_models())


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here")
def test_torchvision_names_need_torchvision():
    with pytest.raises(ImportError, match="torchvision is not installed"):
        build_model("torchvision:resnet18", in_channels=3, image_size=224)


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed here")
def test_timm_names_need_timm():
    with pytest.raises(ImportError, match="timm is not installed"):
        build_model("timm:resnet18", in_channels=3, image_size=224)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_backbone_builds():
    model = build_model("timm:resnet18", embedding_dim=8, in_channels=1, image_size=32)
    assert_unit_embeddings(model(torch.randn(2, 1, 32, 32)), 2, 8, torch.float32, atol=1e-5)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_torchvision_backbone_builds():
    model = build_model("torchvision:resnet18", embedding_dim=8, in_channels=3, image_size=64)
    assert model.feature_dim == 512
    assert_unit_embeddings(model(torch.randn(2, 3, 64, 64)), 2, 8, torch.float32, atol=1e-5)

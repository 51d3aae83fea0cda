import math

import pytest
import torch

from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.vit import Attention, ViT, default_patch_size, vit
from tests.dml_core.models.model_checks import (assert_grads_reach_all_parameters, assert_unit_embeddings,
                                                count_parameters)


def naive_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per head: softmax(Q K^T / sqrt(d)) V from the module's own weights, heads concatenated, projected."""
    dim = x.shape[-1]
    d = dim // attn.heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
    heads = []
    for h in range(attn.heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(weights @ vh)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_attention_equals_naive_softmax_attention(dtype, tol):
    torch.manual_seed(0)
    attn = Attention(dim=24, heads=3).to(dtype)
    x = torch.randn(2, 7, 24, dtype=dtype)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), atol=tol, rtol=tol)


def _tiny_vit(image_size=28, patch_size=7, in_channels=1, **kw):
    torch.manual_seed(0)
    return ViT(image_size=image_size, patch_size=patch_size, in_channels=in_channels, dim=32, depth=2,
               heads=4, **kw)


def _permute_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Rearrange the image's patch grid: patch j of the output is patch perm[j] of the input."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, patch, patch)
    patches = patches[:, perm]
    return patches.reshape(n, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def test_position_embeddings_make_the_model_order_sensitive():
    """Attention is permutation-equivariant, so without position embeddings the CLS output ignores where
    patches are; with them, shuffling the patches must change it."""
    model = _tiny_vit().eval()
    x = torch.randn(2, 1, 28, 28)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    x_shuffled = _permute_patches(x, 7, perm)
    assert not torch.equal(x, x_shuffled)
    with torch.no_grad():
        # At the 0.02-std init attention is nearly uniform and the blocks nearly linear, so the CLS output is
        # close to a mean over tokens, which barely depends on order. Give weights a trained-like scale.
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
        model.pos_embed.normal_(std=1.0)
        assert (model(x) - model(x_shuffled)).abs().max() > 0.05
        model.pos_embed.zero_()
        torch.testing.assert_close(model(x), model(x_shuffled), atol=1e-5, rtol=1e-5)


def test_vit_base_parameter_count_matches_torchvision():
    """ViT-B/16 at 224 px with a 1000-class head has 86,567,656 parameters (torchvision model docs)."""
    assert count_parameters(vit("base", image_size=224, in_channels=3, num_classes=1000)) == 86_567_656


@pytest.mark.parametrize("size,params", [("tiny", 5_717_416), ("small", 22_050_664)])
def test_deit_sizes_parameter_count(size, params):
    """DeiT-Ti/S (patch 16, 224 px, 1000 classes): 5.72 M and 22.05 M parameters, as in timm."""
    assert count_parameters(vit(size, image_size=224, in_channels=3, num_classes=1000)) == params


@pytest.mark.parametrize("image_size,patch_size,in_channels", [(28, 7, 1), (28, 4, 1), (32, 4, 3), (32, 8, 3)])
def test_shape_unit_norm_and_gradients(image_size, patch_size, in_channels):
    backbone = _tiny_vit(image_size, patch_size, in_channels)
    model = EmbeddingModel(backbone, ProjectionHead(backbone.feature_dim, 16))
    x = torch.randn(3, in_channels, image_size, image_size)
    assert_unit_embeddings(model(x), 3, 16, torch.float32, atol=1e-5)
    assert_grads_reach_all_parameters(model, x)


def test_float64_matches_float32():
    backbone = _tiny_vit()
    model = EmbeddingModel(backbone, ProjectionHead(backbone.feature_dim, 16)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z32 = model(x)
        z64 = model.double()(x.double())
    assert_unit_embeddings(z64, 2, 16, torch.float64, atol=1e-12)
    torch.testing.assert_close(z64.float(), z32, atol=1e-5, rtol=1e-4)


def test_dropout_only_in_training():
    model = _tiny_vit(dropout=0.5)
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_default_patch_sizes():
    assert [default_patch_size(s) for s in (28, 32, 64, 224)] == [4, 4, 8, 16]
    assert vit("tiny", image_size=28).patch_size == 4


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of patch_size=4"):
        ViT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="must be 28x28 px"):
        _tiny_vit()(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by heads"):
        Attention(dim=10, heads=3)

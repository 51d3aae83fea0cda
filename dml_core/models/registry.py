"""Build an EmbeddingModel by name: the built-in backbones, or "torchvision:<name>" / "timm:<name>"
when those libraries are installed (imported only when asked for)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

import torch
from torch import nn

from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.resnet import resnet
from dml_core.models.small_cnn import SmallCNN
from dml_core.models.vit import vit

Builder = Callable[..., nn.Module]

# Built-in backbones with a `norm=` option, and its default (models/norm.py). ViTs use LayerNorm, per-sample.
NORM_BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50", "resnet101")
DEFAULT_NORM = "batch"


def _small_cnn(in_channels: int, image_size: int, **kw: Any) -> nn.Module:
    return SmallCNN(in_channels=in_channels, **kw)


def _flatten(in_channels: int, image_size: int) -> nn.Module:
    """No learning at all: the pixels as features (with an identity linear head, the raw-pixel floor)."""
    backbone = nn.Flatten()
    backbone.feature_dim = in_channels * image_size * image_size
    return backbone


def _resnet(depth: int) -> Builder:
    def build(in_channels: int, image_size: int, small_input: bool | None = None, **kw: Any) -> nn.Module:
        small = image_size < 96 if small_input is None else small_input
        return resnet(depth, in_channels=in_channels, small_input=small, **kw)
    return build


def _vit(size: str) -> Builder:
    def build(in_channels: int, image_size: int, **kw: Any) -> nn.Module:
        return vit(size, image_size=image_size, in_channels=in_channels, **kw)
    return build


BACKBONES: dict[str, Builder] = {
    "small_cnn": _small_cnn,
    "flatten": _flatten,
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "resnet101": _resnet(101),
    "vit_tiny": _vit("tiny"),
    "vit_small": _vit("small"),
    "vit_base": _vit("base"),
}
EXTERNAL_PREFIXES = ("torchvision:", "timm:")


def known_models() -> list[str]:
    return sorted(BACKBONES) + [p + "<name>" for p in EXTERNAL_PREFIXES]


def _import_optional(module: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed: install it to use '{module}:<name>' models "
                          f"(built-in models need neither: {sorted(BACKBONES)})")
    try:
        return importlib.import_module(module)
    except Exception as e:  # an installed but broken build (e.g. compiled for another torch)
        raise ImportError(f"{module} is installed but failed to import ({type(e).__name__}: {e}); "
                          f"it must match torch {torch.__version__}") from e


def _infer_feature_dim(backbone: nn.Module, in_channels: int, image_size: int) -> int:
    """Run one dummy image through a classifier-less external backbone to learn its output width."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, in_channels, image_size, image_size))
    backbone.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"backbone returns shape {tuple(out.shape)} after removing its classifier; "
                         "expected (N, features)")
    return int(out.shape[1])


def _torchvision(name: str, in_channels: int, image_size: int, **kw: Any) -> nn.Module:
    tv_models = _import_optional("torchvision").models
    if in_channels != 3:
        raise ValueError(f"torchvision:{name} expects in_channels=3 (RGB), got {in_channels}")
    backbone = tv_models.get_model(name, **kw)
    for attr in ("fc", "heads", "classifier", "head"):
        if isinstance(getattr(backbone, attr, None), nn.Module):
            setattr(backbone, attr, nn.Identity())
            break
    else:
        raise ValueError(f"torchvision:{name}: no fc/heads/classifier/head attribute to remove")
    backbone.feature_dim = _infer_feature_dim(backbone, in_channels, image_size)
    return backbone


def _timm(name: str, in_channels: int, image_size: int, **kw: Any) -> nn.Module:
    timm = _import_optional("timm")
    backbone = timm.create_model(name, num_classes=0, in_chans=in_channels, **kw)
    backbone.feature_dim = int(backbone.num_features)
    return backbone


def build_backbone(name: str, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> nn.Module:
    """The backbone alone (images -> (N, feature_dim)); `kwargs` go to its constructor."""
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], in_channels, image_size, **kwargs)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], in_channels, image_size, **kwargs)
    if name not in BACKBONES:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(known_models())}")
    return BACKBONES[name](in_channels=in_channels, image_size=image_size, **kwargs)


def build_model(name: str, embedding_dim: int = 128, in_channels: int = 1, image_size: int = 28,
                head: str = "mlp", head_hidden_dim: int | None = None, **kwargs: Any) -> EmbeddingModel:
    """Backbone `name` + projection head to `embedding_dim` + L2 normalisation.

    The returned model's `spec` holds these arguments, so `load_model` can rebuild it from a checkpoint;
    for a backbone with a `norm` option (NORM_BACKBONES) the spec records the norm even when defaulted.
    """
    if name in NORM_BACKBONES:
        kwargs.setdefault("norm", DEFAULT_NORM)
    backbone = build_backbone(name, in_channels=in_channels, image_size=image_size, **kwargs)
    proj = ProjectionHead(backbone.feature_dim, embedding_dim, kind=head, hidden_dim=head_hidden_dim)
    spec = {"name": name, "embedding_dim": embedding_dim, "in_channels": in_channels, "image_size": image_size,
            "head": head, "head_hidden_dim": head_hidden_dim, "kwargs": dict(kwargs)}
    return EmbeddingModel(backbone, proj, spec=spec)

"""Embedding backbones (no torchvision needed), the projection head, and build-by-name."""
from dml_core.models.checkpoint import load_model, model_checkpoint, read_checkpoint, save_model
from dml_core.models.head import EmbeddingModel, ProjectionHead
from dml_core.models.norm import NORMS, FrozenBatchNorm2d
from dml_core.models.registry import build_backbone, build_model, known_models
from dml_core.models.resnet import BasicBlock, Bottleneck, ResNet, resnet, resnet18, resnet50
from dml_core.models.small_cnn import SmallCNN
from dml_core.models.vit import ViT, vit

__all__ = [
    "NORMS", "BasicBlock", "Bottleneck", "EmbeddingModel", "FrozenBatchNorm2d", "ProjectionHead", "ResNet",
    "SmallCNN", "ViT",
    "build_backbone", "build_model", "known_models", "load_model", "model_checkpoint", "read_checkpoint",
    "resnet", "resnet18", "resnet50", "save_model", "vit",
]

"""Projection head and the embedding model: backbone features -> L2-normalised embeddings."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear map, or a two-layer MLP (Linear-ReLU-Linear, as in SimCLR), from `in_dim` to `embedding_dim`,
    followed by L2 normalisation of each row."""

    def __init__(self, in_dim: int, embedding_dim: int = 128, kind: str = "mlp", hidden_dim: int | None = None):
        super().__init__()
        if in_dim < 1 or embedding_dim < 1:
            raise ValueError(f"in_dim and embedding_dim must be >= 1, got {in_dim} and {embedding_dim}")
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, embedding_dim)
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, embedding_dim))
        else:
            raise ValueError(f"head kind must be 'mlp' or 'linear', got {kind!r}")
        self.in_dim, self.embedding_dim, self.kind = in_dim, embedding_dim, kind

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 2 or feats.shape[1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects (N, {self.in_dim}) features, got shape {tuple(feats.shape)}")
        return F.normalize(self.proj(feats), dim=1)


class EmbeddingModel(nn.Module):
    """backbone (images -> (N, feature_dim) features) + head; forward returns (N, embedding_dim) unit rows.

    `spec` records how the model was built (see registry.build_model) so a checkpoint can rebuild it.
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead, spec: dict[str, Any] | None = None):
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if feature_dim is not None and feature_dim != head.in_dim:
            raise ValueError(f"backbone feature_dim={feature_dim} does not match head in_dim={head.in_dim}")
        self.backbone, self.head = backbone, head
        self.spec = dict(spec or {})

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    @property
    def feature_dim(self) -> int:
        return self.head.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

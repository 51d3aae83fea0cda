"""Composable embedding losses: `InfoNCE() + TCM()` is a loss too (pytorch-metric-learning style)."""
from __future__ import annotations

import torch
from torch import nn


class EmbeddingLoss(nn.Module):
    """A loss over a batch of embeddings.

    `forward(z, labels, ids=None)` takes this worker's raw (not yet normalised) embeddings `(b, D)`,
    integer labels `(b,)` and stable sample ids `(b,)`, and returns this worker's share of the
    global-batch loss (METHODS.md 1.2). After each call `self.stats` holds floats worth logging.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, float] = {}

    def __add__(self, other: "EmbeddingLoss") -> "CombinedLoss":
        left = list(self.terms) if isinstance(self, CombinedLoss) else [self]
        right = list(other.terms) if isinstance(other, CombinedLoss) else [other]
        return CombinedLoss(left + right)


class CombinedLoss(EmbeddingLoss):
    """Sum of losses; `stats` holds each term's value and stats under its class name."""

    def __init__(self, terms: list[EmbeddingLoss]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        total, stats = 0.0, {}
        for term in self.terms:
            value = term(z, labels, ids)
            name = type(term).__name__
            stats[f"{name}/loss"] = float(value.detach())
            stats.update({f"{name}/{k}": v for k, v in term.stats.items()})
            total = total + value
        self.stats = stats
        return total

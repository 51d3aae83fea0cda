"""Composable embedding losses: `InfoNCE() + 0.5 * TCM()` is a loss too (pytorch-metric-learning style)."""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from dml_core.losses.batch import EmbeddingBatch


class EmbeddingLoss(nn.Module):
    """A loss over a batch of embeddings.

    A loss implements `compute(batch)`: this rank's share of the global-batch loss (METHODS.md 1.2) from an
    `EmbeddingBatch`. `forward(z, labels, ids=None)` computes it on this process's raw embeddings `(b, D)`,
    integer labels `(b,)` and stable sample ids `(b,)` alone and never communicates, even when a process
    group exists; `DistributedLoss` opts into the global batch. After each call `self.stats` holds floats.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, float] = {}

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement compute(batch)")

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.compute(EmbeddingBatch.local(z, labels, ids))

    def __add__(self, other: "EmbeddingLoss") -> "CombinedLoss":
        return CombinedLoss([self, other])

    def __mul__(self, weight: float) -> "CombinedLoss":
        return CombinedLoss([self], weights=[weight])

    __rmul__ = __mul__


def default_name(loss: nn.Module) -> str:
    """`InfoNCE` -> `info_nce`, `TCM` -> `tcm`, `DecomposableLoss` -> `decomposable`."""
    name = re.sub(r"Loss$", "", type(loss).__name__) or type(loss).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class CombinedLoss(EmbeddingLoss):
    """Weighted sum of named terms, each computed on the same batch.

    `terms` is a list (names from the class: `info_nce`, `tcm`, a second `tcm_2`) or a dict name -> loss;
    `weights` one float per entry (default 1). A CombinedLoss among the terms is flattened into its own
    named, weighted terms (a named one with several terms stays one term). `stats` holds `"{name}/loss"`
    (the term's unweighted value, this rank's share) and `"{name}/{stat}"`. State dict keys are
    `terms.{i}.*`, in term order.
    """

    def __init__(self, terms: list[EmbeddingLoss] | Mapping[str, EmbeddingLoss],
                 weights: list[float] | None = None) -> None:
        super().__init__()
        given = list(terms.items()) if isinstance(terms, Mapping) else [(None, t) for t in terms]
        weights = [1.0] * len(given) if weights is None else list(weights)
        if len(weights) != len(given):
            raise ValueError(f"CombinedLoss: {len(weights)} weights for {len(given)} terms")
        entries = []
        for (name, loss), weight in zip(given, weights):
            inner = loss.entries if isinstance(loss, CombinedLoss) else [(None, loss, 1.0)]
            if name is not None and len(inner) > 1:
                inner = [(name, loss, 1.0)]
            entries += [(name or n, t, float(weight) * w) for n, t, w in inner]
        self.terms = nn.ModuleList(t for _, t, _ in entries)
        self.weights = [w for _, _, w in entries]
        self._given = [n for n, _, _ in entries]
        self.names = _unique_names(self._given, self.terms)

    @property
    def entries(self) -> list[tuple[str | None, EmbeddingLoss, float]]:
        """(given name or None, term, weight) of every term."""
        return list(zip(self._given, self.terms, self.weights))

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        total, stats = 0.0, {}
        for name, term, weight in zip(self.names, self.terms, self.weights):
            value = term.compute(batch)
            stats[f"{name}/loss"] = float(value.detach())
            stats.update({f"{name}/{k}": v for k, v in term.stats.items()})
            total = total + (value if weight == 1.0 else weight * value)
        self.stats = stats
        return total


def _unique_names(given: list[str | None], terms) -> list[str]:
    explicit = [n for n in given if n is not None]
    if len(set(explicit)) != len(explicit):
        raise ValueError(f"CombinedLoss: duplicate term names {explicit}")
    taken, names = set(explicit), []
    for name, term in zip(given, terms):
        if name is None:
            base = name = default_name(term)
            i = 1
            while name in taken:
                i += 1
                name = f"{base}_{i}"
            taken.add(name)
        names.append(name)
    return names

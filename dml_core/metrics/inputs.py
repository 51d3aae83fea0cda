"""Turn user input (tensors or arrays) into validated, L2-normalised embeddings and integer labels."""
from __future__ import annotations

import torch

from dml_core.checks import as_tensor as _as_tensor, check_embeddings, check_labels, l2_normalize


def as_tensor(x, name: str) -> torch.Tensor:
    """Accept a torch tensor, a NumPy array or a list; never copy a tensor that is already one (detached)."""
    return _as_tensor(x, name, detach=True)


def prepare(z, labels, name: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `z` (N, D) and `labels` (N,), return (L2-normalised float z, int64 labels).

    Half precision is promoted to float32; float64 stays float64 (exact oracles use it).
    """
    z = as_tensor(z, name)
    labels = as_tensor(labels, f"labels of {name}")
    if z.dim() == 2 and z.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(z.shape)} (no items to evaluate)")
    if z.is_floating_point() and z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    check_embeddings(z, name=name)
    check_labels(labels, z.shape[0], name)
    return l2_normalize(z), labels.long().to(z.device)


def require_two_classes(labels: torch.Tensor, what: str) -> None:
    """A retrieval or threshold metric over a single class is meaningless: say so."""
    if torch.unique(labels).numel() < 2:
        raise ValueError(
            f"{what} needs at least two classes, but all {labels.numel()} labels are "
            f"{int(labels[0])}: there are no negative pairs"
        )

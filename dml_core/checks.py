"""Input validation shared by losses and metrics: clear errors instead of silent NaNs."""
from __future__ import annotations

import torch


def check_embeddings(z: torch.Tensor, labels: torch.Tensor | None = None, name: str = "z") -> None:
    """Raise ValueError if `z` is not a finite, non-empty (N, D) matrix with no zero rows,
    or if `labels` does not hold exactly one integer label per row."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) matrix of embeddings, got shape {tuple(z.shape)}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {z.dtype}")
    with torch.no_grad():
        finite = torch.isfinite(z).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()[:5].tolist()
            raise ValueError(f"{name} has NaN or infinite values in rows {bad} (first 5 shown)")
        zero = z.norm(dim=1) == 0
        if bool(zero.any()):
            bad = torch.nonzero(zero).flatten()[:5].tolist()
            raise ValueError(f"{name} has zero-norm rows {bad} (first 5 shown): cannot L2-normalise")
    if labels is not None:
        check_labels(labels, z.shape[0], name)


def check_labels(labels: torch.Tensor, n: int, name: str = "z") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must be a 1-D tensor with one label per row of {name}: "
            f"got labels of shape {tuple(labels.shape)} for {n} rows"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got {labels.dtype}")


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(z, dim=1)

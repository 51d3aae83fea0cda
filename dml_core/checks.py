"""Input validation shared by losses and metrics: clear errors instead of silent NaNs."""
from __future__ import annotations

import math

import numpy as np
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


# ---- shared input conversion and parameter checks of the functional forms (METHODS.md 7) ----

def as_tensor(x, name: str, *, detach: bool = False) -> torch.Tensor:
    """A torch tensor from a tensor, a NumPy array or a (nested) list; a tensor is never copied.

    `detach=True` drops the autograd graph (metrics); losses keep it so that gradients flow to `z`.
    """
    if isinstance(x, torch.Tensor):
        return x.detach() if detach else x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        try:
            return torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: cannot convert the list to a tensor ({e})") from None
    raise TypeError(f"{name} must be a torch.Tensor, NumPy array or list, got {type(x).__name__}")


def embedding_inputs(z, labels, name: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    """(z, labels) as tensors for a functional loss: tensors, NumPy arrays or lists in.

    `z` keeps its autograd graph and dtype (a NumPy float64 array stays float64); integer labels become
    int64 on `z`'s device. Shapes and values are checked later by `check_embeddings` (EmbeddingBatch.local).
    """
    z = as_tensor(z, name)
    labels = as_tensor(labels, f"labels of {name}")
    if not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
        labels = labels.long()
    return z, labels.to(z.device)


def _real(value, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad):
            raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(value, name: str, owner: str) -> float:
    """`float(value)` when it is a finite number > 0; otherwise a ValueError (TypeError for a non-number)."""
    v = _real(value, name, owner)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{owner}: {name} must be > 0 and finite, got {value}")
    return v


def check_int(value, name: str, owner: str, minimum: int) -> int:
    """`int(value)` when it is an integer >= `minimum`; otherwise a ValueError (TypeError for a non-integer)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)

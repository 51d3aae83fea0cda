"""Chunked pair distances d = sqrt(2 - 2 s) between L2-normalised rows, never the full N x N at once."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All L2 distances between rows of a and rows of b (both normalised)."""
    return (a @ b.T).mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()


def paired_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between row i of a and row i of b."""
    return torch.sqrt(torch.clamp(2.0 - 2.0 * (a * b).sum(dim=1), min=0.0))


def row_chunks(z: torch.Tensor, max_chunk_elements: int, upper: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, d): distances of rows start:end to every row of z, or with `upper` only to
    rows start: onwards (enough for unordered pairs, half the work).

    The same chunking always gives bitwise the same values, which the two-pass exact quantile relies on.
    """
    n = z.shape[0]
    rows = max(1, int(max_chunk_elements) // max(1, n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        yield s, e, distances(z[s:e], z[s:] if upper else z)


def thresholds_for(t: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """Thresholds in the distances' dtype such that `d <= T` is exactly `d <= t` for the float64 t.

    Rounding t to float32 could round up and accept a pair lying just above t: round down instead.
    """
    t = np.asarray(t, dtype=np.float64)
    if dtype == torch.float64:
        return torch.from_numpy(t.copy()).to(device)
    t32 = t.astype(np.float32)
    up = t32.astype(np.float64) > t
    t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
    return torch.from_numpy(t32).to(device)

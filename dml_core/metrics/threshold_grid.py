"""The OPIS threshold grid and a fast, exact bucket index of distances on it.

The K calibration thresholds are `np.linspace(t_lo, t_hi, K)`; the grid extends them with the same
spacing on both sides (clipped to [0, 2]) so the plot shows where the calibration range sits. Because
the grid is uniform, the bucket of a distance (number of thresholds strictly below it) is computed
arithmetically and then corrected against the stored thresholds, which is exact and several times
cheaper than a binary search over 4e8 distances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dml_core.metrics.pair_distances import thresholds_for


@dataclass
class ThresholdGrid:
    values: np.ndarray  # float64, increasing
    calib: slice  # where the K calibration thresholds sit in `values`
    tensor: torch.Tensor  # `values` in the distances' dtype, rounded so that d <= T is exactly d <= t
    step: float | None  # spacing, None when K < 2 or the range is empty (binary search then)

    @property
    def size(self) -> int:
        return len(self.values)

    def bucket(self, d: torch.Tensor) -> torch.Tensor:
        """Number of thresholds strictly below each distance, so d <= t_k iff k >= bucket (int32).

        Arithmetic on the uniform grid, then a binary search only for the few distances lying within
        1e-3 of a grid step from a threshold, where rounding could put the arithmetic result off by one.
        """
        if self.step is None:
            return torch.bucketize(d, self.tensor, out_int32=True)
        f = (d - float(self.tensor[0])).div_(self.step)
        b = torch.ceil(f)
        near = torch.nonzero(((b - f) < NEAR) | ((b - f) > 1.0 - NEAR), as_tuple=True)
        b = b.clamp_(0, self.tensor.numel()).to(torch.int32)
        b[near] = torch.bucketize(d[near], self.tensor, out_int32=True)
        return b


NEAR = 1e-3  # in grid steps; float32 rounding moves (d - t0) / step by about 1e-5 steps at most


def make_grid(t_lo: float, t_hi: float, num_thresholds: int, extend: float, dtype, device) -> ThresholdGrid:
    calib = np.linspace(t_lo, t_hi, int(num_thresholds))
    if num_thresholds < 2 or not t_hi > t_lo:
        return ThresholdGrid(calib, slice(0, len(calib)), thresholds_for(calib, dtype, device), None)
    step = (t_hi - t_lo) / (num_thresholds - 1)
    reach = int(round(max(extend, 0.0) * (num_thresholds - 1)))
    n_left = min(reach, int(math.floor(t_lo / step)))
    n_right = min(reach, int(math.floor((2.0 - t_hi) / step)))
    left = t_lo - step * np.arange(n_left, 0, -1)
    right = t_hi + step * np.arange(1, n_right + 1)
    values = np.concatenate([left, calib, right])
    return ThresholdGrid(values, slice(n_left, n_left + len(calib)), thresholds_for(values, dtype, device), step)

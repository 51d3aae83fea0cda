"""Synthetic embeddings shared by the metric tests."""
from __future__ import annotations

import numpy as np


def clustered(n_classes: int, per_class, dim: int, spread=0.6, seed: int = 0, dtype=np.float64):
    """Gaussian clusters around random centres; `per_class` an int or a list of class sizes,
    `spread` a float or one per class. Returns (z, labels) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    sizes = [per_class] * n_classes if np.isscalar(per_class) else list(per_class)
    spreads = np.broadcast_to(np.asarray(spread, dtype=np.float64), (n_classes,))
    labels = np.repeat(np.arange(n_classes), sizes)
    centres = rng.normal(size=(n_classes, dim))
    z = centres[labels] + spreads[labels, None] * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return z[perm].astype(dtype), labels[perm]


def random_data(n: int, n_classes: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.integers(0, n_classes, size=n)

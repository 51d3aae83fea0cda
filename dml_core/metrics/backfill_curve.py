"""The backfill curve of an ordered partial backfill (METHODS 6.1, FastFill) and the orders it compares.

A gallery first transformed by h (`h(old)`) is re-embedded with the new model item by item, in some order.
After a fraction f of it is done, the gallery holds `new` embeddings for the first items of the order and
transformed ones for the rest; the curve is `M(new, gallery_f)` at f = 0, 0.05, ..., 1 and its area the mean
of those 21 values. The evaluation is leave-one-out on the same items: item i's new embedding queries every
other item's current gallery embedding (its own left out), so f = 0 gives `M(new, h(old))` and f = 1
`M(new, new)`.

Orders (row positions into the gallery, first re-embedded first):
- uncertainty: h's predicted log-variance, highest first (ties by sample id): what FastFill serves;
- random: a seeded permutation, the baseline;
- oracle: `||h(old) - new||`, largest first; it needs the new embeddings it is meant to save computing, so it
  is an upper reference only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dml_core.metrics.compatibility import METRICS, metric_value
from dml_core.metrics.inputs import as_tensor
from dml_core.metrics.retrieval import evaluate_retrieval

ORDERS = ("uncertainty", "random", "oracle")
FRACTIONS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1


@dataclass
class BackfillCurve:
    """`values[j]` = M(new, gallery with `fractions[j]` backfilled); `area` = their mean."""

    fractions: np.ndarray
    values: np.ndarray
    area: float
    metric: str = "map_at_r"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "fractions": [float(f) for f in self.fractions],
                "values": [float(v) for v in self.values], "area": float(self.area)}


def backfilled_count(fraction: float, n: int) -> int:
    """Items re-embedded at `fraction` of a gallery of `n`: `round(f * n)`, Python's rounding (halves to the even
    integer: 0.05 of 30 is 2, 0.15 of 30 is 4), as a partial backfill with `budget` f re-embeds
    (gallery/partial_backfill.py), so a curve point is the gallery that budget serves."""
    return min(n, max(0, round(fraction * n)))


def backfill_order(kind: str, ids, *, log_var=None, new=None, transformed=None, seed: int = 0) -> np.ndarray:
    """Row positions of the gallery in the order they are re-embedded (METHODS 6.1), for `kind` in ORDERS.

    `ids` are the rows' sample ids (the tie-break, and what makes `random` independent of the row order).
    uncertainty needs `log_var` (N,); oracle needs `new` and `transformed` (N, D), the transformed gallery
    as served (normalised); random uses `seed`.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"ids must be a non-empty 1-d array, got shape {ids.shape}")
    if kind == "uncertainty":
        if log_var is None:
            raise ValueError("the uncertainty order needs log_var (an h trained with uncertainty)")
        return _descending(_vector(log_var, len(ids), "log_var"), ids)
    if kind == "oracle":
        if new is None or transformed is None:
            raise ValueError("the oracle order needs the new and the transformed gallery embeddings")
        new, transformed = as_tensor(new, "new").double(), as_tensor(transformed, "transformed").double()
        if new.shape != transformed.shape or new.shape[0] != len(ids):
            raise ValueError(f"new {tuple(new.shape)} and transformed {tuple(transformed.shape)} must both be "
                             f"({len(ids)}, D)")
        return _descending((transformed - new).norm(dim=1).numpy(), ids)
    if kind == "random":
        return np.argsort(ids, kind="stable")[np.random.default_rng(seed).permutation(len(ids))]
    raise ValueError(f"unknown backfill order {kind!r}; known: {', '.join(ORDERS)}")


def _vector(x, n: int, name: str) -> np.ndarray:
    x = as_tensor(x, name).double().numpy()
    if x.shape != (n,) or not np.isfinite(x).all():
        raise ValueError(f"{name} must be {n} finite values, got shape {x.shape}")
    return x


def _descending(score: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.lexsort((ids, -score))  # the last key sorts first


def backfill_curve(query_z, labels, new_gallery, transformed_gallery, order, fractions=None,
                   metric: str = "map_at_r") -> BackfillCurve:
    """The backfill curve (METHODS 6.1), leave-one-out on the N evaluation items.

    `query_z`: the items' new-model embeddings (the queries); `new_gallery` / `transformed_gallery`: the same
    items (same rows) embedded by the new model and by h; `order`: a permutation of the N rows, re-embedded
    first to last. At each fraction f (default FRACTIONS) the first `backfilled_count(f, N)` rows of `order`
    (round(f * N), halves to even) hold new embeddings, the rest transformed ones; every item queries the others,
    itself excluded. `metric`: recall_at_1 or map_at_r. Area: the mean of the values.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    new = as_tensor(new_gallery, "new_gallery").float()
    transformed = as_tensor(transformed_gallery, "transformed_gallery").float()
    if new.shape != transformed.shape:
        raise ValueError(f"new_gallery {tuple(new.shape)} and transformed_gallery {tuple(transformed.shape)} differ")
    n = new.shape[0]
    order = np.asarray(order)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} gallery rows")
    fractions = np.asarray(FRACTIONS if fractions is None else fractions, dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) == 0 or fractions.min() < 0 or fractions.max() > 1:
        raise ValueError(f"fractions must be a non-empty list of values in [0, 1], got {fractions}")
    order = torch.from_numpy(order.astype(np.int64))
    values = []
    for f in fractions:
        gallery = transformed.clone()
        done = order[:backfilled_count(float(f), n)]
        gallery[done] = new[done]
        result = evaluate_retrieval(query_z, labels, ks=(1,), gallery_z=gallery, gallery_labels=labels,
                                    exclude_self=True, compute_map=metric == "map_at_r")
        values.append(metric_value(result, metric))
    values = np.asarray(values, dtype=np.float64)
    return BackfillCurve(fractions, values, float(values.mean()), metric)

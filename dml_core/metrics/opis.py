"""OPIS and epsilon-OPIS: how inconsistent one distance threshold is across classes (METHODS 5).

`opis(...)` is the exact path by default; `max_neg_per_class=` switches to the sampled path for large
sets: all positive pairs are still used; every member of a class is paired with about
`max_neg_per_class` items drawn uniformly from the other classes (so a class gets roughly
size * max_neg_per_class negative pairs; all of its negatives once the cap reaches N - largest class);
the calibration quantiles and the pooled negatives come from `num_calibration_pairs` uniform negative
pairs. The sample sizes actually used are recorded in `result.sampling`. When the cap covers every
negative (`max_neg_per_class >= N - largest class size`) nothing is sampled: the calibration range and the
pooled curve come from all negative pairs too, the result equals the exact path and
`sampling["exact_negatives"]` is True (it is True only then).
Choices fixed here: items of classes with < 2 members still serve as negatives of the other classes and
in the pooled curve; the eps-OPIS ranking is ascending mean utility, ties (means within TIE_TOLERANCE, i.e.
equal up to float rounding) broken by label order; the worst set has ceil(eps * C) classes computed in
exact rational arithmetic on the decimal value of eps (0.07 * 100 gives 7, 0.1 * 30 gives 3).
Cost of the exact path: three passes over the N^2 pairs (two when all negative distances fit in
`max_calibration_buffer`), memory O(max_chunk_elements + C * K * (1 + 2 * plot_extend)).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from dml_core.metrics.inputs import prepare, require_two_classes
from dml_core.metrics.opis_calibration import exact_negative_quantiles, sample_negative_distances
from dml_core.metrics.opis_counts import (ClassCounts, counts_of, exact_class_counts, positive_class_counts,
                                          sampled_negative_class_counts)
from dml_core.metrics.opis_result import OpisResult
from dml_core.metrics.threshold_grid import make_grid


# Mean utilities closer than this are a tie (they differ only by float rounding), ranked by class label.
TIE_TOLERANCE = 1e-12


def num_worst_classes(eps: float, num_classes: int) -> int:
    """ceil(eps * C) in exact arithmetic on eps's decimal value (its shortest repr): 0.07 * 100 gives 7."""
    return math.ceil(Fraction(repr(float(eps))) * int(num_classes))


def rank_classes(mean_utility: np.ndarray, tol: float = TIE_TOLERANCE) -> np.ndarray:
    """Indices by ascending mean utility; means within `tol` of the first of their run are tied and keep
    index (= label) order."""
    m = np.asarray(mean_utility, dtype=np.float64)
    order = np.argsort(m, kind="stable")
    group = np.empty(len(order), dtype=np.int64)
    g, first = 0, None
    for pos, i in enumerate(order):
        if first is None or m[i] - first > tol:
            g, first = g + 1, m[i]
        group[pos] = g
    return order[np.lexsort((order, group))]


def utility(tar: np.ndarray, trr: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """F-beta of TAR and TRR: (1 + b^2) TAR TRR / (b^2 TRR + TAR), 0 where both are 0."""
    b2 = beta * beta
    num = (1.0 + b2) * tar * trr
    den = b2 * trr + tar
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def opis_from_curves(class_u: np.ndarray, pooled_u: np.ndarray, eps: float) -> tuple[float, float, np.ndarray]:
    """(OPIS, eps-OPIS, indices of the worst classes) from (C, K) class curves and the (K,) pooled curve."""
    c = class_u.shape[0]
    value = float(np.mean(np.mean((class_u - pooled_u[None, :]) ** 2, axis=1)))
    n_worst = num_worst_classes(eps, c)
    if not 0 < n_worst < c:
        raise ValueError(f"eps-OPIS with eps={eps} and {c} evaluated classes leaves no worst or no rest set; "
                         "it needs at least two classes with two or more items")
    order = rank_classes(class_u.mean(axis=1))
    worst, rest = order[:n_worst], order[n_worst:]
    gap = class_u[worst].mean(axis=0) - class_u[rest].mean(axis=0)
    return value, float(np.mean(gap ** 2)), worst


def _validate(far_lo, far_hi, num_thresholds, beta, eps, max_neg_per_class):
    if not 0.0 < far_lo < far_hi < 1.0:
        raise ValueError(f"need 0 < far_lo < far_hi < 1, got far_lo={far_lo}, far_hi={far_hi}")
    if int(num_thresholds) < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if max_neg_per_class is not None and int(max_neg_per_class) < 1:
        raise ValueError(f"max_neg_per_class must be >= 1 or None (exact), got {max_neg_per_class}")


def _rates(pos, neg, beta):
    """TAR, TRR and utility (float64 numpy) from ClassCounts of positives and negatives."""
    tar = pos.le.double().numpy() / np.maximum(pos.total.double().numpy(), 1)[:, None]
    trr = (neg.total[:, None] - neg.le).double().numpy() / np.maximum(neg.total.double().numpy(), 1)[:, None]
    return tar, trr, utility(tar, trr, beta)


def opis(z, labels, far_lo: float = 1e-3, far_hi: float = 1e-1, num_thresholds: int = 101, beta: float = 1.0,
         eps: float = 0.1, *, max_neg_per_class: int | None = None, num_calibration_pairs: int = 2_000_000,
         seed: int = 0, plot_extend: float = 1.0, max_chunk_elements: int = 1 << 22,
         max_calibration_buffer: int = 1 << 24, device=None) -> OpisResult:
    """OPIS / eps-OPIS of embeddings `z` with class `labels` (exact unless `max_neg_per_class` is set).

    Returns an `OpisResult` (a mapping: result["opis"], result["eps_opis"], thresholds, per-class and pooled
    utility curves, pair counts, skipped classes, and the sample sizes of the sampled path). The plot curves
    extend the calibration range by `plot_extend` times its width on each side (same spacing).
    """
    _validate(far_lo, far_hi, num_thresholds, beta, eps, max_neg_per_class)
    z, labels = prepare(z, labels, "z")
    require_two_classes(labels, "OPIS")
    if device is not None:
        z, labels = z.to(device), labels.to(device)
    uniq, cls, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    evaluated = sizes >= 2
    if not bool(evaluated.any()):
        raise ValueError("OPIS needs positive pairs, but no class has two or more items")
    perm = torch.argsort(cls, stable=True)  # items sorted by class: class c is one block of rows
    zs, cls_s = z[perm], cls[perm]
    start = torch.cumsum(sizes, 0) - sizes
    qs = [far_lo, far_hi]
    n = z.shape[0]
    sizes_cpu = sizes.cpu()
    num_neg_pairs = (n * n - int((sizes_cpu ** 2).sum())) // 2
    exhaustive = max_neg_per_class is not None and int(max_neg_per_class) >= n - int(sizes_cpu.max())
    if max_neg_per_class is None or exhaustive:
        (t_lo, t_hi), calib_info = exact_negative_quantiles(
            zs, cls_s, start + sizes, qs, max_chunk_elements=max_chunk_elements,
            max_calibration_buffer=max_calibration_buffer)
        grid = make_grid(t_lo, t_hi, num_thresholds, plot_extend, z.dtype, z.device)
    if max_neg_per_class is None:
        pos, neg = exact_class_counts(zs, cls_s, start, sizes, grid, max_chunk_elements)
        pooled_pos, pooled_neg = _pool(pos), _pool(neg)
        pos_pairs = pos.total // 2  # ordered pairs counted each positive pair twice (rates are unaffected)
        sampling, method = None, "exact"
    else:
        gen = torch.Generator().manual_seed(int(seed))
        if not exhaustive:
            calib_d = sample_negative_distances(zs, cls_s, int(num_calibration_pairs), gen)
            t_lo, t_hi = np.quantile(calib_d.double().numpy(), qs)
            calib_info = {"method": "sampled", "num_calibration_pairs": int(num_calibration_pairs)}
            grid = make_grid(t_lo, t_hi, num_thresholds, plot_extend, z.dtype, z.device)
        pos = positive_class_counts(zs, start, sizes, grid, max_chunk_elements)
        neg, pairs = sampled_negative_class_counts(zs, cls_s, uniq.numel(), max_neg_per_class, grid, gen,
                                                   max_chunk_elements)
        # with every negative at hand the pooled curve uses them all (each pair once per end, as the exact path)
        pooled_pos, pooled_neg = _pool(pos), (_pool(neg) if exhaustive else counts_of(calib_d, grid))
        pos_pairs = pos.total
        sampling = {"max_neg_per_class": int(max_neg_per_class), "seed": int(seed),
                    "num_calibration_pairs": 0 if exhaustive else int(num_calibration_pairs),
                    "exact_negatives": exhaustive, "exact_calibration": exhaustive,
                    "neg_pairs_per_class": pairs[evaluated.cpu()].numpy(),
                    "total_neg_pairs_sampled": int(pairs[evaluated.cpu()].sum()), "positives": "all pairs"}
        method = "sampled"
    ev = evaluated.cpu().numpy()
    _, _, u_all = _rates(pos, neg, beta)
    tar_p, trr_p, u_pool = _rates(pooled_pos, pooled_neg, beta)
    k = grid.calib
    class_u, pooled_u = u_all[ev][:, k], u_pool[0, k]
    value, eps_value, worst = opis_from_curves(class_u, pooled_u, eps)
    class_labels = uniq.cpu()[evaluated.cpu()].tolist()
    return OpisResult(
        opis=value, eps_opis=eps_value, method=method, beta=beta, eps=eps, far_lo=far_lo, far_hi=far_hi,
        num_thresholds=int(num_thresholds), t_lo=float(t_lo), t_hi=float(t_hi), num_items=n,
        num_classes=int(ev.sum()), num_skipped_classes=int((~ev).sum()), num_pos_pairs=int(pos_pairs.sum()),
        num_neg_pairs=int(num_neg_pairs), class_labels=class_labels, worst_classes=[class_labels[i] for i in worst],
        calibration=calib_info, sampling=sampling, plot_extend=float(plot_extend),
        thresholds=grid.values[k], class_utility=class_u, pooled_utility=pooled_u, pooled_tar=tar_p[0, k],
        pooled_trr=trr_p[0, k], class_mean_utility=class_u.mean(axis=1),
        class_pos_pairs=pos_pairs[evaluated.cpu()].numpy(),
        class_neg_pairs=(sizes_cpu * (n - sizes_cpu))[evaluated.cpu()].numpy(),
        plot_thresholds=grid.values, plot_class_utility=u_all[ev], plot_pooled_utility=u_pool[0],
    )


def _pool(c):
    return ClassCounts(le=c.le.sum(dim=0, keepdim=True), total=c.total.sum().reshape(1))

"""Calibration range of OPIS: quantiles of ALL negative-pair distances (METHODS 5), exact or sampled.

Exact cost: one pass over the N^2/2 unordered pairs (in row chunks of `max_chunk_elements` distances) when the
negative distances fit in `max_calibration_buffer` values; otherwise two passes and O(num_bins) memory:
a fine histogram locates the bins holding the wanted order statistics, and the second pass keeps only
the values inside those bins, from which the exact order statistics (and NumPy's linear interpolation)
follow. At 20,000 items that avoids holding 2e8 floats (0.8 GB in float32).
"""
from __future__ import annotations

import numpy as np
import torch

from dml_core.metrics.pair_distances import distances, row_chunks


def count_negative_pairs(class_sizes: torch.Tensor) -> int:
    n = int(class_sizes.sum())
    return (n * n - int((class_sizes.long() ** 2).sum())) // 2


def _excluded_lead(s, e, cls, class_end):
    """Within the upper chunk of rows s:e (columns s:), the leading columns holding every pair that is
    not an unordered negative: j <= i, or j in the row's own class (items are sorted by class)."""
    end = int(class_end[cls[e - 1]])
    rows = torch.arange(s, e, device=cls.device)[:, None]
    cols = torch.arange(s, end, device=cls.device)[None, :]
    return end - s, (cols <= rows) | (cls[s:e, None] == cls[None, s:end])


def _bins(d, num_bins):
    return (d * (num_bins / 2.0)).to(torch.int64).clamp_(0, num_bins - 1)  # distances lie in [0, 2]


def exact_negative_quantiles(zs, cls, class_end, qs, *, max_chunk_elements=1 << 22,
                             max_calibration_buffer=1 << 24, num_bins=1 << 16) -> tuple[np.ndarray, dict]:
    """Exact `np.quantile(all negative distances, qs)` (linear interpolation) without storing them all.

    `zs`, `cls`: items sorted by class; `class_end[c]`: one past the last row of class c.
    """
    n_neg = count_negative_pairs(torch.bincount(cls))
    if n_neg == 0:
        raise ValueError("OPIS calibration needs negative pairs, but every item has the same label")
    if n_neg <= max_calibration_buffer:
        vals = []
        for s, e, d in row_chunks(zs, max_chunk_elements, upper=True):
            width, excl = _excluded_lead(s, e, cls, class_end)
            keep = torch.ones_like(d, dtype=torch.bool)
            keep[:, :width] = ~excl
            vals.append(d[keep].cpu())
        q = np.quantile(torch.cat(vals).double().numpy(), qs)
        return np.asarray(q, dtype=np.float64), {"method": "all_values", "num_negative_pairs": n_neg}
    hist = torch.zeros(num_bins, dtype=torch.long, device=zs.device)
    for s, e, d in row_chunks(zs, max_chunk_elements, upper=True):
        b = _bins(d, num_bins)
        width, excl = _excluded_lead(s, e, cls, class_end)
        hist += torch.bincount(b.flatten(), minlength=num_bins)
        hist -= torch.bincount(b[:, :width][excl], minlength=num_bins)
    hist = hist.cpu()
    cum = torch.cumsum(hist, 0)
    pos = np.asarray(qs, dtype=np.float64) * (n_neg - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_neg - 1)
    ranks = np.unique(np.concatenate([lo, hi]))
    rank_bins = torch.searchsorted(cum, torch.from_numpy(ranks), right=True)
    wanted = torch.unique(rank_bins).tolist()
    kept, kept_bins = [], []
    for s, e, d in row_chunks(zs, max_chunk_elements, upper=True):
        b = _bins(d, num_bins)
        sel = b == wanted[0]
        for w in wanted[1:]:
            sel |= b == w
        r, c = torch.nonzero(sel, as_tuple=True)
        ok = (c > r) & (cls[s + r] != cls[s + c])
        kept.append(d[r[ok], c[ok]].cpu())
        kept_bins.append(b[r[ok], c[ok]].cpu())
    kept, kb = torch.cat(kept).double(), torch.cat(kept_bins)
    stat = {}
    for w in wanted:
        vb = torch.sort(kept[kb == w]).values
        if vb.numel() != int(hist[w]):
            raise RuntimeError("distances changed between the two calibration passes (non-deterministic matmul?)")
        start = int(cum[w] - hist[w])
        for r in ranks[(rank_bins == w).numpy()]:
            stat[int(r)] = float(vb[int(r) - start])
    out = []
    for p, a, b in zip(pos, lo, hi):
        gamma = p - a  # NumPy's own interpolation between the two order statistics
        out.append(float(np.quantile(np.array([stat[int(a)], stat[int(b)]]), gamma)))
    return np.asarray(out), {"method": "histogram_refine", "num_negative_pairs": n_neg,
                             "num_bins": num_bins, "values_kept": int(kept.numel())}


def sample_negative_distances(zs, cls, num_pairs, generator, block=256, return_pairs=False):
    """Distances of `num_pairs` ordered negative pairs drawn uniformly from ALL negative pairs.

    Blocks of `block` x `block` pairs: rows and columns are items drawn independently and uniformly (with
    replacement), so every pair of a block is a uniform ordered pair; keeping the different-label ones
    leaves uniform negative pairs. One small matmul per block instead of a gather per pair.
    """
    n = cls.numel()
    out, pairs, kept = [], [], 0
    while kept < num_pairs:
        idx = torch.randint(0, n, (2, block), generator=generator).to(zs.device)
        neg = cls[idx[0]][:, None] != cls[idx[1]][None, :]
        r, c = torch.nonzero(neg, as_tuple=True)
        if r.numel() == 0:
            continue
        d = distances(zs[idx[0]], zs[idx[1]])[r, c]
        out.append(d.cpu())
        if return_pairs:
            pairs.append(torch.stack([idx[0][r], idx[1][c]]).cpu())
        kept += d.numel()
    d = torch.cat(out)[:num_pairs]
    return (d, torch.cat(pairs, dim=1)[:, :num_pairs]) if return_pairs else d

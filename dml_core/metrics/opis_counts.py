"""Per-class pair counts at every OPIS threshold at once: counts of d <= t_k for positives and negatives.

A distance d falls in bucket b = #{k : t_k < d}; then d <= t_k exactly when k >= b, so a histogram of
buckets per class followed by a cumulative sum gives the counts at all K thresholds, with no Python
loop over thresholds or pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dml_core.metrics.pair_distances import distances, row_chunks


@dataclass
class ClassCounts:
    """`le[c, k]` = pairs of class c with d <= t_k; `total[c]` = pairs of class c (int64, CPU)."""

    le: torch.Tensor
    total: torch.Tensor


def _to_counts(hist: torch.Tensor, num_classes: int, num_t: int) -> ClassCounts:
    h = hist.view(num_classes, num_t + 1)
    return ClassCounts(le=torch.cumsum(h, dim=1)[:, :num_t].cpu(), total=h.sum(dim=1).cpu())


def exact_class_counts(zs, cls, class_start, class_size, grid, max_chunk_elements=1 << 22):
    """Exact per-class counts over all pairs, items sorted by class. Positives come from ordered pairs
    (each unordered pair twice: `total` is halved for reporting by the caller); negatives of class c are
    the pairs with exactly one end in c, each once. Returns (positives, negatives)."""
    num_classes, w = class_size.numel(), grid.size + 1
    all_hist = torch.zeros(num_classes, w, dtype=torch.long, device=zs.device)
    pos_hist = torch.zeros_like(all_hist)
    starts, ends = class_start.tolist(), (class_start + class_size).tolist()
    for s, e, d in row_chunks(zs, max_chunk_elements):
        b = grid.bucket(d)
        del d
        for c in range(int(cls[s]), int(cls[e - 1]) + 1):
            r0, r1 = max(s, starts[c]), min(e, ends[c])
            if r1 <= r0:
                continue
            block = b[r0 - s:r1 - s, starts[c]:ends[c]]  # same-class columns of these rows
            own = torch.arange(r1 - r0, device=zs.device)
            itself = torch.bincount(block[own, own + (r0 - starts[c])], minlength=w)
            all_hist[c] += torch.bincount(b[r0 - s:r1 - s].flatten(), minlength=w) - itself
            pos_hist[c] += torch.bincount(block.flatten(), minlength=w) - itself
    neg_hist = all_hist - pos_hist
    return (_to_counts(pos_hist.flatten(), num_classes, grid.size),
            _to_counts(neg_hist.flatten(), num_classes, grid.size))


def positive_class_counts(zs, class_start, class_size, grid, max_chunk_elements=1 << 22):
    """Exact counts over unordered positive pairs, items sorted by class (class c = rows start_c ...).

    Classes of equal size are batched through one bmm; a class too large for one block goes row-chunked.
    """
    num_classes, w = class_size.numel(), grid.size + 1
    hist = torch.zeros(num_classes * w, dtype=torch.long, device=zs.device)
    for s in torch.unique(class_size).tolist():
        if s < 2:
            continue
        ids = torch.nonzero(class_size == s).flatten()
        if s * s <= max_chunk_elements:
            iu = torch.triu_indices(s, s, offset=1, device=zs.device)
            per = max(1, max_chunk_elements // (s * s))
            for i in range(0, ids.numel(), per):
                c = ids[i:i + per]
                block = zs[class_start[c][:, None] + torch.arange(s, device=zs.device)]
                sims = torch.bmm(block, block.transpose(1, 2))[:, iu[0], iu[1]]
                b = grid.bucket(sims.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_())
                hist += torch.bincount((c[:, None] * w + b).flatten(), minlength=hist.numel())
        else:
            for c in ids.tolist():
                _large_class_positives(zs, int(class_start[c]), s, c, w, grid, hist, max_chunk_elements)
    return _to_counts(hist, num_classes, grid.size)


def _large_class_positives(zs, start, s, c, w, grid, hist, max_chunk_elements):
    block = zs[start:start + s]
    rows = max(1, max_chunk_elements // s)
    for r in range(0, s, rows):
        d = distances(block[r:r + rows], block)
        upper = torch.arange(s, device=zs.device)[None, :] > torch.arange(r, min(s, r + rows), device=zs.device)[:, None]
        b = grid.bucket(d[upper])
        hist += torch.bincount(c * w + b, minlength=hist.numel())


def sampled_negative_class_counts(zs, cls, num_classes, max_neg_per_class, grid, generator,
                                  max_chunk_elements=1 << 22):
    """Per-class counts over sampled negatives, items sorted by class.

    Rows go in chunks; each chunk draws a pool of `max_neg_per_class` items uniformly (with replacement)
    from the whole set and pairs every row with every pool item of another class. So every member of a
    class gets about `max_neg_per_class` partners, each a uniform draw from outside its class, and each
    sampled pair is a uniform draw from the class's negative pairs; only one small gather per chunk.
    When `max_neg_per_class` >= N - (largest class size), the pool is the whole set: exact negatives.
    Returns (counts, negative pairs used per class)."""
    n, w = zs.shape[0], grid.size + 1
    sizes = torch.bincount(cls, minlength=num_classes)
    exhaustive = int(max_neg_per_class) >= n - int(sizes.max())
    p = n if exhaustive else int(max_neg_per_class)
    rows = max(1, max_chunk_elements // p)
    hist = torch.zeros(num_classes * w + 1, dtype=torch.long, device=zs.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        pool = (torch.arange(n) if exhaustive else torch.randint(0, n, (p,), generator=generator)).to(zs.device)
        b = grid.bucket(distances(zs[r0:r1], zs[pool]))
        key = cls[r0:r1, None] * w + b
        key[cls[r0:r1, None] == cls[pool][None, :]] = num_classes * w  # own class: not a negative, dropped
        hist += torch.bincount(key.flatten(), minlength=hist.numel())
    counts = _to_counts(hist[:-1], num_classes, grid.size)
    return counts, counts.total


def counts_of(d: torch.Tensor, grid) -> ClassCounts:
    """Counts of one pooled set of distances (a single 'class')."""
    b = grid.bucket(d.to(grid.tensor.device))
    return _to_counts(torch.bincount(b, minlength=grid.size + 1), 1, grid.size)

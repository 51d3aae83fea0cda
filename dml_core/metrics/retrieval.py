"""Recall@K and MAP@R (METHODS section 4), leave-one-out or query/gallery.

Modes:
- leave-one-out (default): every item of `z` queries all the others;
- query/gallery: pass `gallery_z` and `gallery_labels`; `z`/`labels` are then the queries;
- same items, two embeddings (cross-model leave-one-out): query/gallery with `exclude_self=True`, where
  gallery row i is the same item as query row i and is left out of query i's neighbours.

Queries with no relevant item in their gallery (R = 0: a singleton class in leave-one-out, or a query
label absent from the gallery) are skipped and counted, as pytorch-metric-learning does.
MAP@R needs the R nearest neighbours per query; queries are processed in chunks sorted by R and each
chunk asks only for the largest R it holds, so memory stays bounded by the chunk size whatever R is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dml_core.metrics.inputs import prepare, require_two_classes
from dml_core.metrics.knn import KnnSearcher


@dataclass
class RetrievalResult:
    """Recall@K for each K, MAP@R, and per-query top-1 correctness (for negative flips)."""

    recall: dict[int, float]
    map_at_r: float | None
    mode: str
    num_queries: int
    num_skipped_queries: int
    top1_correct: np.ndarray | None = field(default=None, repr=False)  # (Nq,) bool, False if skipped
    valid: np.ndarray | None = field(default=None, repr=False)  # (Nq,) bool: query had R > 0

    def to_dict(self) -> dict:
        out = {f"recall_at_{k}": v for k, v in sorted(self.recall.items())}
        if self.map_at_r is not None:
            out["map_at_r"] = self.map_at_r
        out.update(mode=self.mode, num_queries=self.num_queries, num_skipped_queries=self.num_skipped_queries)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalResult":
        recall = {int(k[len("recall_at_"):]): float(v) for k, v in d.items() if k.startswith("recall_at_")}
        return cls(recall=recall, map_at_r=d.get("map_at_r"), mode=d["mode"],
                   num_queries=int(d["num_queries"]), num_skipped_queries=int(d["num_skipped_queries"]))


def relevant_counts(query_labels: torch.Tensor, gallery_labels: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """R per query: gallery items sharing its label (minus the item itself when excluded)."""
    uniq, counts = torch.unique(gallery_labels.cpu(), return_counts=True)
    q = query_labels.cpu()
    pos = torch.searchsorted(uniq, q).clamp(max=uniq.numel() - 1)
    r = torch.where(uniq[pos] == q, counts[pos], torch.zeros_like(q))
    return r - 1 if exclude_self else r


def _prepare_pair(z, labels, gallery_z, gallery_labels, exclude_self):
    zq, lq = prepare(z, labels, "z")
    if gallery_z is None:
        if gallery_labels is not None:
            raise ValueError("gallery_labels given without gallery_z")
        require_two_classes(lq, "retrieval evaluation")
        return zq, lq, zq, lq, True if exclude_self is None else exclude_self, "leave_one_out"
    if gallery_labels is None:
        raise ValueError("gallery_z given without gallery_labels")
    zg, lg = prepare(gallery_z, gallery_labels, "gallery_z")
    require_two_classes(lg, "retrieval evaluation (gallery)")
    if zq.shape[1] != zg.shape[1]:
        raise ValueError(f"query dimension {zq.shape[1]} differs from gallery dimension {zg.shape[1]}")
    exclude_self = bool(exclude_self)
    if exclude_self and (zq.shape[0] != zg.shape[0] or not torch.equal(lq.cpu(), lg.cpu())):
        raise ValueError("exclude_self=True needs the gallery to be the same items as the queries "
                         "(same count and same labels in the same order)")
    return zq, lq, zg, lg, exclude_self, ("cross_leave_one_out" if exclude_self else "query_gallery")


def evaluate_retrieval(z, labels, ks=(1,), *, gallery_z=None, gallery_labels=None, exclude_self=None,
                       compute_map: bool = True, backend: str = "auto", use_gpu: bool = False,
                       max_chunk_elements: int = 1 << 24) -> RetrievalResult:
    """Recall@k for every k in `ks` and (optionally) MAP@R from one k-NN pass."""
    zq, lq, zg, lg, exclude_self, mode = _prepare_pair(z, labels, gallery_z, gallery_labels, exclude_self)
    ks = sorted({int(k) for k in ks})
    candidates = zg.shape[0] - int(exclude_self)
    if not ks or ks[0] < 1 or ks[-1] > candidates:
        raise ValueError(f"every k must be between 1 and the number of gallery candidates ({candidates}), got {ks}")
    r = relevant_counts(lq, lg, exclude_self)
    valid = r > 0
    if not bool(valid.any()):
        raise ValueError("no query has a relevant (same-label) item in its gallery: retrieval metrics are undefined")
    order = torch.nonzero(valid).flatten()
    order = order[torch.argsort(r[order], stable=True)]
    searcher = KnnSearcher(zg, backend=backend, use_gpu=use_gpu, max_chunk_elements=max_chunk_elements)
    k_needed = max(ks[-1], int(r.max())) if compute_map else ks[-1]
    per_row = zg.shape[0] if searcher.backend == "torch" else k_needed
    rows = max(1, max_chunk_elements // max(1, per_row))
    hits = {k: torch.zeros(lq.shape[0], dtype=torch.bool) for k in ks}
    ap = torch.zeros(lq.shape[0], dtype=torch.float64)
    lg_cpu, lq_cpu = lg.cpu(), lq.cpu()
    for s in range(0, order.numel(), rows):
        qi = order[s:s + rows]
        rq = r[qi]
        k = max(ks[-1], int(rq.max())) if compute_map else ks[-1]
        res = searcher.search(zq[qi], k, self_index=qi if exclude_self else None)
        rel = lg_cpu[res.indices] == lq_cpu[qi][:, None]
        for kk in ks:
            hits[kk][qi] = rel[:, :kk].any(dim=1)
        if compute_map:
            ap[qi] = _average_precision_at_r(rel, rq)
    n = int(valid.sum())
    recall = {k: float(hits[k][valid].double().mean()) for k in ks}
    return RetrievalResult(
        recall=recall, map_at_r=float(ap[valid].mean()) if compute_map else None, mode=mode,
        num_queries=n, num_skipped_queries=int(lq.shape[0] - n),
        top1_correct=(hits[1] if 1 in ks else torch.zeros_like(valid)).numpy().copy(), valid=valid.numpy().copy(),
    )


def _average_precision_at_r(rel: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AP@R per row: (1/R) sum_{k<=R} P@k rel_k, using only the first R neighbours of each row."""
    k = rel.shape[1]
    pos = torch.arange(1, k + 1)
    rel = rel & (pos[None, :] <= r[:, None])
    prec = torch.cumsum(rel, dim=1).double() / pos
    return (prec * rel).sum(dim=1) / r.double()


def recall_at_k(z, labels, k: int = 1, **kwargs) -> float:
    """Recall@k (1 if any of the k nearest neighbours shares the query's label), leave-one-out by default.

    Keyword arguments are those of `evaluate_retrieval` (gallery_z, gallery_labels, exclude_self, backend, ...).
    """
    return evaluate_retrieval(z, labels, ks=(k,), compute_map=False, **kwargs).recall[k]


def map_at_r(z, labels, **kwargs) -> float:
    """MAP@R (Musgrave et al. 2020), leave-one-out by default; keyword arguments as `evaluate_retrieval`."""
    return evaluate_retrieval(z, labels, ks=(1,), compute_map=True, **kwargs).map_at_r

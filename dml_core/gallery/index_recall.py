"""Recall@k of an approximate FAISS index against exact search, on gallery vectors held out as queries.

Definition (recorded in every index manifest): two disjoint random samples of gallery rows are kept out of
the index while it is tuned and measured, and added to it afterwards. The search parameters are tuned on the
first sample; the recorded recall@k is the mean over the second sample's queries of
|approximate top-k ∩ exact top-k| / k, both searched among the other gallery rows. Held-out queries behave
like real ones: a query that is itself in an HNSW graph is found too easily (at 10,000 clustered vectors the
recall of gallery rows as queries, leave-one-out, read 0.98 where unseen queries got 0.95).
"""
from __future__ import annotations

import numpy as np
import torch

from dml_core.metrics.knn import KnnSearcher

RECALL_DEFINITION = (
    "queries: the gallery rows query_rows, held out of the index while it was measured (added afterwards); "
    "recall@k = mean over queries of |approximate top-k ∩ exact top-k| / k among the other gallery rows"
)


def held_out_rows(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random samples of gallery rows (tuning, measuring), each of min(count, n // 4) rows."""
    m = min(count, n // 4)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:m]), np.sort(perm[m:2 * m])


def overlap_recall(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours found among its approximate ones (-1 never matches)."""
    hits = (approx_rows[:, :, None] == exact_rows[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / exact_rows.shape[1])


class RecallProbe:
    """Exact top-k of a fixed set of queries, computed once, against which an index's results are scored."""

    def __init__(self, queries: np.ndarray, k: int, exact: KnnSearcher):
        self.queries, self.k = np.ascontiguousarray(queries), k
        self.exact_rows = exact.search(torch.from_numpy(self.queries), k).indices.numpy()

    def recall(self, index) -> float:
        """Recall@k of a FAISS index (at its current search parameters) on these queries."""
        return overlap_recall(index.search(self.queries, self.k)[1], self.exact_rows)

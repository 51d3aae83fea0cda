"""Exact k-nearest-neighbour search by inner product: FAISS flat index or chunked torch matmul.

Both backends return the same neighbours (up to the order of exactly tied similarities).
Queries are processed in row chunks so no (N x N) similarity matrix is ever held in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

try:  # faiss is an optional dependency (faiss-cpu or faiss-gpu)
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None

BACKENDS = ("auto", "faiss", "torch")
FAISS_GPU_MAX_K = 2048  # FAISS GPU flat search refuses larger k


@dataclass
class KnnResult:
    similarities: torch.Tensor  # (Nq, k), descending per row
    indices: torch.Tensor  # (Nq, k) int64 rows of the gallery


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"knn backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faiss" if faiss is not None else "torch"
    if backend == "faiss" and faiss is None:
        raise ImportError("knn backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
    return backend


class KnnSearcher:
    """Holds a gallery (and its FAISS index, built once) and answers exact top-k queries.

    `self_index[i]` (optional) is a gallery row excluded from query i's neighbours: the query item
    itself in leave-one-out mode, also when query and gallery are the same items embedded by
    different models.
    """

    def __init__(self, gallery: torch.Tensor, backend: str = "auto", use_gpu: bool = False,
                 max_chunk_elements: int = 1 << 24):
        self.gallery = gallery
        self.backend = resolve_backend(backend)
        self.use_gpu = use_gpu
        self.max_chunk_elements = int(max_chunk_elements)
        self._index = None
        self._gpu_index = None
        if self.backend == "faiss":
            xb = np.ascontiguousarray(gallery.detach().cpu().numpy().astype(np.float32, copy=False))
            self._index = faiss.IndexFlatIP(xb.shape[1])
            self._index.add(xb)
            if use_gpu and faiss.get_num_gpus() > 0:
                self._gpu_res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)

    @property
    def size(self) -> int:
        return self.gallery.shape[0]

    def search(self, query: torch.Tensor, k: int, self_index: torch.Tensor | None = None) -> KnnResult:
        available = self.size - (1 if self_index is not None else 0)
        if not 1 <= k <= available:
            raise ValueError(f"k={k} must be between 1 and the number of gallery candidates ({available})")
        if self_index is not None and self_index.shape[0] != query.shape[0]:
            raise ValueError("self_index needs one gallery row per query")
        if query.shape[1] != self.gallery.shape[1]:
            raise ValueError(
                f"query dimension {query.shape[1]} differs from gallery dimension {self.gallery.shape[1]}"
            )
        if self.backend == "faiss":
            return self._search_faiss(query, k, self_index)
        return self._search_torch(query, k, self_index)

    def _search_torch(self, query, k, self_index) -> KnnResult:
        device = self.gallery.device
        if self.use_gpu and torch.cuda.is_available():
            device = torch.device("cuda")
        g = self.gallery.to(device)
        q = query.to(device=device, dtype=g.dtype)
        rows = max(1, self.max_chunk_elements // max(1, g.shape[0]))
        sims, idx = [], []
        for s in range(0, q.shape[0], rows):
            block = q[s:s + rows] @ g.T
            if self_index is not None:
                own = self_index[s:s + rows].to(device)
                block[torch.arange(block.shape[0], device=device), own] = float("-inf")
            v, i = torch.topk(block, k, dim=1, largest=True, sorted=True)
            sims.append(v.cpu())
            idx.append(i.cpu())
        return KnnResult(torch.cat(sims), torch.cat(idx))

    def _search_faiss(self, query, k, self_index) -> KnnResult:
        extra = 1 if self_index is not None else 0
        kk = min(k + extra, self.size)
        index = self._gpu_index if (self._gpu_index is not None and kk <= FAISS_GPU_MAX_K) else self._index
        xq = np.ascontiguousarray(query.detach().cpu().numpy().astype(np.float32, copy=False))
        dist, ind = index.search(xq, kk)
        dist, ind = torch.from_numpy(dist), torch.from_numpy(ind).long()
        if self_index is None:
            return KnnResult(dist, ind)
        drop = ind == self_index.cpu().long()[:, None]
        # Exact duplicates can push the item itself past the k+1 returned: then drop the last one.
        drop[~drop.any(dim=1), -1] = True
        keep = ~drop
        n = ind.shape[0]
        return KnnResult(dist[keep].view(n, kk - 1)[:, :k], ind[keep].view(n, kk - 1)[:, :k])


def knn(query, gallery, k: int, *, self_index=None, backend: str = "auto", use_gpu: bool = False,
        max_chunk_elements: int = 1 << 24) -> KnnResult:
    """Exact inner-product top-k of each query row among gallery rows (inputs assumed normalised)."""
    searcher = KnnSearcher(gallery, backend=backend, use_gpu=use_gpu, max_chunk_elements=max_chunk_elements)
    return searcher.search(query, k, self_index=self_index)


def knn_leave_one_out(z: torch.Tensor, k: int, **kwargs) -> KnnResult:
    """Top-k neighbours of every row of `z` among the other rows."""
    return knn(z, z, k, self_index=torch.arange(z.shape[0]), **kwargs)

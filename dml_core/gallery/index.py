"""A FAISS index over a gallery's embeddings: build (with its recall measured), search, save and load.

Vectors are L2-normalised float32 and compared by inner product (cosine similarity), as everywhere in
this project. `factory` is a faiss.index_factory string: exact `Flat` by default; `IVF<n>,Flat`,
`IVF<n>,PQ<m>` or `HNSW<M>` for large galleries. A saved ids array maps FAISS row i to its item id (the
rows are not in the embeddings' order: the recall queries are added last, see index_recall.py). On GPU
with faiss-gpu where present (not HNSW: FAISS has no GPU HNSW), on CPU otherwise.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import faiss
import numpy as np
import torch

from dml_core.checks import as_tensor, check_embeddings
from dml_core.gallery.index_files import ID_MAPPING, IndexManifest, read_index_files, write_index_files
from dml_core.gallery.index_recall import RECALL_DEFINITION, RecallProbe, held_out_rows
from dml_core.metrics.knn import KnnSearcher

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
MAX_NPROBE = 2048  # also FAISS's GPU limit
MAX_EF_SEARCH = 4096
TUNED = {"ivf": ("nprobe", "nprobe", MAX_NPROBE), "hnsw": ("efSearch", "ef_search", MAX_EF_SEARCH)}  # FAISS, spec


@dataclass
class IndexSpec:
    """How to build a gallery index.

    Args:
        factory: faiss.index_factory string; the metric is always inner product.
        nprobe: IVF lists searched per query. None: tuned at build time, the smallest power of two whose
            recall@k on a tuning sample reaches `target_recall`.
        ef_search: HNSW search breadth (efSearch); None: tuned like `nprobe`.
        target_recall: what tuning aims at: 0.95 plus a margin for the sampling error of 1,000 queries.
        min_recall: if set, a build whose measured recall@k is lower raises instead of returning the index.
        recall_k: the k of the recorded recall@k.
        recall_queries: gallery rows used as queries, for tuning and (a disjoint sample) for measuring.
        train_per_centroid: training sample = min(N, train_per_centroid * nlist) (IVF; 256 centroids for PQ).
        device: "cpu", "cuda" (faiss-gpu) or "auto" (GPU where FAISS sees one and the index type has one).
        seed: of the training and query samples.
    """

    factory: str = "Flat"
    nprobe: int | None = None
    ef_search: int | None = None
    target_recall: float = 0.96
    min_recall: float | None = None
    recall_k: int = 10
    recall_queries: int = 1000
    train_per_centroid: int = 256
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ValueError(f"index factory must be a non-empty string, got {self.factory!r}")
        for name in ("nprobe", "ef_search"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"index {name} must be a positive integer or None, got {v!r}")
        for name in ("target_recall", "min_recall"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"index {name} must be in (0, 1], got {v!r}")
        for name in ("recall_k", "recall_queries", "train_per_centroid"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"index {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ValueError(f"index device must be one of {DEVICES}, got {self.device!r}")


@dataclass
class IndexSearchResult:
    ids: torch.Tensor  # (Nq, k) int64 item ids; -1 where the index found fewer than k vectors
    similarities: torch.Tensor  # (Nq, k) float32 inner products, descending per row


class GalleryIndex:
    """A built or loaded FAISS index with the item ids of its rows and its manifest."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, manifest: IndexManifest, source: str = "(in memory)"):
        self.index, self.ids, self.manifest, self.source = index, ids, manifest, source
        _set_search_params(index, manifest.search_params)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return self.manifest.count

    def search(self, queries, k: int = 10) -> IndexSearchResult:
        """Top-k item ids and similarities of each query row (rows are L2-normalised here)."""
        q = _as_vectors(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dimension {q.shape[1]}, the index {self.source} has "
                             f"dimension {self.dim}")
        if not 1 <= k <= self.count:
            raise ValueError(f"k={k} must be between 1 and the index size {self.count}")
        sims, rows = self.index.search(q, k)
        ids = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
        return IndexSearchResult(torch.from_numpy(ids), torch.from_numpy(sims))

    def save(self, directory: str, name: str = "index") -> str:
        """Write `<name>.faiss`, `<name>_ids.npy` and, last, `<name>.json` under `directory`; the manifest URL."""
        cpu = faiss.index_gpu_to_cpu(self.index) if self.manifest.device == "cuda" else self.index
        return write_index_files(cpu, self.ids, self.manifest, directory, name)

    @classmethod
    def load(cls, directory: str, name: str = "index", device: str = "cpu") -> GalleryIndex:
        """The index saved by `save`, its files checked against the manifest; on GPU with device="cuda"."""
        index, ids, manifest = read_index_files(directory, name)
        manifest.device = _resolve_device(device, index)
        if manifest.device == "cuda":
            index = _to_gpu(index)
        return cls(index, ids, manifest, source=f"{directory}/{name}.faiss")


def build_index(embeddings, ids=None, spec: IndexSpec | None = None) -> GalleryIndex:
    """Build `spec.factory` over `embeddings` (N, D) with item `ids` (default 0..N-1); approximate indexes
    get their search parameters tuned (unless given) and their recall@k measured against exact search."""
    spec = spec or IndexSpec()
    x = _as_vectors(embeddings, "gallery embeddings")
    ids = _check_ids(ids, len(x))
    start = time.perf_counter()
    index = _make(spec.factory, x.shape[1])
    kind, ivf = _kind(index), faiss.try_extract_index_ivf(index)  # read on the CPU index: GPU ones hide both
    nlist = ivf.nlist if ivf is not None else None
    device = _resolve_device(spec.device, index)
    if device == "cuda":
        index = _to_gpu(index)
    train_size = _train(index, x, spec, nlist)
    build_seconds = time.perf_counter() - start
    order, params, tuned, recall, add_seconds = _add_and_measure(index, kind, nlist, x, spec)
    build_seconds += add_seconds
    manifest = IndexManifest(
        factory=spec.factory, metric="inner_product", dim=x.shape[1], count=len(x), search_params=params,
        tuned=tuned, train_size=train_size, build_seconds=round(build_seconds, 3), device=device, recall=recall,
        id_mapping=ID_MAPPING, files={}, faiss_version=faiss.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if spec.min_recall is not None and recall is not None and recall["value"] < spec.min_recall:
        raise ValueError(f"index {spec.factory} reaches recall@{recall['k']} {recall['value']:.4f}, below "
                         f"min_recall {spec.min_recall} (search params {params})")
    return GalleryIndex(index, ids[order], manifest)


def _as_vectors(x, name: str) -> np.ndarray:
    z = as_tensor(x, name, detach=True)
    check_embeddings(z, name=name)
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return np.ascontiguousarray(z.cpu().numpy(), dtype=np.float32)


def _check_ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    a = as_tensor(ids, "ids", detach=True).cpu().numpy()
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be {n} integers, one per embedding row; got {a.dtype} of shape {a.shape}")
    if n and a.min() < 0:
        raise ValueError(f"ids must be non-negative (-1 marks 'no result'); row {int(np.argmin(a))} has {a.min()}")
    if len(np.unique(a)) != n:
        raise ValueError(f"ids must be unique; {n - len(np.unique(a))} duplicate(s)")
    return a.astype(np.int64)


def _make(factory: str, dim: int) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS index factory string {factory!r} for dim {dim}: "
                         f"{str(e).splitlines()[-1]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # only for Hamming-filtered search, which we never use; minutes to train
    return index


def _kind(index: faiss.Index) -> str:
    """"ivf", "hnsw", "exact" (a flat index) or "other", for the search parameter that matters."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    return "exact" if isinstance(inner, faiss.IndexFlat) else "other"


def _resolve_device(device: str, index: faiss.Index) -> str:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "auto":
        return "cuda" if gpus > 0 and _kind(index) != "hnsw" else "cpu"
    if device == "cuda" and gpus == 0:
        raise ValueError("index device 'cuda' requested but FAISS sees no GPU (faiss-gpu not installed?)")
    if device == "cuda" and _kind(index) == "hnsw":
        raise ValueError("FAISS has no GPU HNSW index: use device 'cpu' (or 'auto')")
    return device


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    return faiss.StandardGpuResources()  # one per process: it holds the GPU's scratch memory


def _to_gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def _train(index: faiss.Index, x: np.ndarray, spec: IndexSpec, nlist: int | None) -> int:
    """Train on min(N, train_per_centroid * centroids) random rows; the number of rows used (0: no training)."""
    if index.is_trained:
        return 0
    centroids = nlist or 256  # IVF lists, else a PQ-style codebook of 256 centroids
    if len(x) < centroids:
        raise ValueError(f"index {spec.factory} needs at least {centroids} vectors to train its {centroids} "
                         f"centroids; the gallery has {len(x)}")
    n = min(len(x), spec.train_per_centroid * centroids)
    rows = np.sort(np.random.default_rng(spec.seed).choice(len(x), n, replace=False))
    index.train(x[rows])
    return n


def _add_and_measure(index: faiss.Index, kind: str, nlist: int | None, x: np.ndarray, spec: IndexSpec):
    """Add all rows of `x`, the recall query rows last, after tuning and measuring on them (index_recall.py):
    (order: FAISS row i is row order[i] of x, search params, tuned, recall record, seconds spent adding)."""
    no_rows = np.zeros(0, dtype=np.int64)
    tune_rows, measure_rows = (no_rows, no_rows) if kind == "exact" else held_out_rows(len(x), spec.recall_queries,
                                                                                        spec.seed)
    held = np.concatenate([tune_rows, measure_rows]).astype(np.int64)
    order = np.concatenate([np.setdiff1d(np.arange(len(x)), held), held])
    rest = order[:len(x) - len(held)]
    start = time.perf_counter()
    index.add(x[rest])
    seconds = time.perf_counter() - start
    params, tuned, recall = _search_params_and_recall(index, kind, nlist, x, rest, (tune_rows, measure_rows), spec)
    start = time.perf_counter()
    index.add(x[held])
    return order, params, tuned, recall, seconds + time.perf_counter() - start


def _search_params_and_recall(index: faiss.Index, kind: str, nlist: int | None, x: np.ndarray, rest: np.ndarray,
                              held: tuple[np.ndarray, np.ndarray], spec: IndexSpec):
    """(search params, whether tuned, recall record) of an index holding the rows `rest` of `x`, the `held`
    rows (tuning, measuring) being its queries; recall None for an exact index (or too few rows)."""
    tune_rows, measure_rows = held
    k = min(spec.recall_k, len(rest))
    if len(measure_rows) == 0:
        return {}, False, None
    name, field, cap = TUNED.get(kind, (None, None, 0))
    given = getattr(spec, field) if field else None
    if name == "nprobe":
        cap = min(cap, nlist)
    exact = KnnSearcher(torch.from_numpy(x[rest]), backend="faiss")
    params, tuned = ({name: given} if given else {}), False
    if name is not None and given is None:
        params, tuned = {name: _tune(index, name, cap, RecallProbe(x[tune_rows], k, exact), spec)}, True
    _set_search_params(index, params)
    value = RecallProbe(x[measure_rows], k, exact).recall(index)
    if value < spec.target_recall:
        log.warning("index %s: recall@%d %.4f with %s is below the target %.2f", spec.factory, k, value, params,
                    spec.target_recall)
    return params, tuned, {"k": k, "value": value, "query_rows": measure_rows.tolist(),
                           "definition": RECALL_DEFINITION}


def _tune(index: faiss.Index, name: str, cap: int, probe: RecallProbe, spec: IndexSpec) -> int:
    """The smallest power of two (16 for efSearch, 1 for nprobe, up to `cap`) reaching the target recall."""
    value = 16 if name == "efSearch" else 1
    while True:
        _set_search_params(index, {name: min(value, cap)})
        if value >= cap or probe.recall(index) >= spec.target_recall:
            return min(value, cap)
        value *= 2


def _set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") and _on_gpu(index) \
        else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _on_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(faiss.downcast_index(index), faiss.GpuIndex)

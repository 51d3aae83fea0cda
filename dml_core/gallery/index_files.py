"""A gallery index on storage: `<name>.faiss` (faiss.write_index), `<name>_ids.npy` (FAISS row -> item id)
and `<name>.json` (the index manifest), local or s3://.

The manifest is written last and records the size and sha256 of the other two files, so its presence means
the index is complete, and a corrupt or truncated index file is caught before FAISS reads it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any

import faiss
import numpy as np

from dml_core import storage

FORMAT = 1
CHUNK = 1 << 22
ID_MAPPING = "ids array: FAISS row i holds the item ids[i] (int64, the ids file)"


class IndexFileError(ValueError):
    """An index file or its manifest is missing a field, corrupt, truncated or inconsistent."""


@dataclass
class IndexManifest:
    """What an index is and how it was built; the JSON beside the index file."""

    factory: str  # the faiss.index_factory string
    metric: str  # always "inner_product" (vectors L2-normalised, so cosine similarity)
    dim: int
    count: int
    search_params: dict[str, int]  # {"nprobe": n} (IVF), {"efSearch": n} (HNSW), {} (Flat)
    tuned: bool  # search_params chosen at build time (the smallest reaching the target recall on a sample)
    train_size: int  # vectors the index was trained on (0: no training)
    build_seconds: float  # factory + training + adding, without the recall measurement
    device: str  # "cpu" or "cuda": where it was built (in the saved file), where it lives (once loaded)
    recall: dict[str, Any] | None  # {"k", "value", "query_rows" (embedding rows), "definition"}; None: exact
    id_mapping: str
    files: dict[str, dict[str, Any]]  # "index" / "ids": {"name", "bytes", "sha256"}
    faiss_version: str
    created: str
    format: int = FORMAT

    @property
    def recall_at_k(self) -> float | None:
        return None if self.recall is None else self.recall["value"]

    @classmethod
    def from_dict(cls, d: Any, url: str) -> IndexManifest:
        if not isinstance(d, dict):
            raise IndexFileError(f"{url}: an index manifest must be a JSON object")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(d) if n != "format")
        if missing:
            raise IndexFileError(f"{url}: index manifest lacks the field(s) {missing}")
        if d.get("format", FORMAT) != FORMAT:
            raise IndexFileError(f"{url}: index manifest format {d['format']!r}, this code reads {FORMAT}")
        for part in ("index", "ids"):
            entry = d["files"].get(part) if isinstance(d["files"], dict) else None
            if not isinstance(entry, dict) or not {"name", "bytes", "sha256"} <= set(entry):
                raise IndexFileError(f"{url}: files.{part} must give the name, bytes and sha256 of the {part} file")
        return cls(**{k: v for k, v in d.items() if k in names})


def file_names(name: str) -> dict[str, str]:
    return {"index": f"{name}.faiss", "ids": f"{name}_ids.npy", "manifest": f"{name}.json"}


def write_index_files(index: faiss.Index, ids: np.ndarray, manifest: IndexManifest, directory: str,
                      name: str) -> str:
    """Write the index (a CPU index), its ids and, last, its manifest under `directory`; the manifest URL."""
    names = file_names(name)
    with tempfile.TemporaryDirectory(prefix="dml-index-") as tmp:
        local = os.path.join(tmp, names["index"])
        faiss.write_index(index, local)
        manifest.files = {"index": _copy_to_storage(local, storage.join(directory, names["index"]))}
    buf = io.BytesIO()
    np.save(buf, ids.astype(np.int64), allow_pickle=False)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(directory, names["ids"]), data)
    manifest.files["ids"] = {"name": names["ids"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    url = storage.join(directory, names["manifest"])
    storage.write_bytes_atomic(url, json.dumps(asdict(manifest), indent=1).encode("utf-8"))
    return url


def read_index_files(directory: str, name: str) -> tuple[faiss.Index, np.ndarray, IndexManifest]:
    """Read and check what `write_index_files` wrote: (CPU index, ids, manifest)."""
    names = file_names(name)
    url = storage.join(directory, names["manifest"])
    try:
        manifest = IndexManifest.from_dict(json.loads(storage.read_bytes(url)), url)
    except FileNotFoundError:
        raise FileNotFoundError(f"no index manifest at {url}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{url}: unreadable index manifest ({e})") from e
    index = _read_faiss(storage.join(directory, manifest.files["index"]["name"]), manifest.files["index"])
    ids = _read_ids(storage.join(directory, manifest.files["ids"]["name"]), manifest.files["ids"])
    if (index.d, index.ntotal, len(ids)) != (manifest.dim, manifest.count, manifest.count):
        raise IndexFileError(f"{url}: manifest says dim {manifest.dim} and {manifest.count} vectors, the index "
                             f"file holds dim {index.d} and {index.ntotal} vectors, the ids file {len(ids)} ids")
    return index, ids, manifest


def _copy_to_storage(local: str, url: str) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(local, "rb") as src, storage.open_write_atomic(url) as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return {"name": url.rsplit("/", 1)[-1], "bytes": size, "sha256": digest.hexdigest()}


def _check_file(url: str, size: int, sha256: str, expected: dict) -> None:
    if (size, sha256) != (expected["bytes"], expected["sha256"]):
        raise IndexFileError(f"index file {url} is corrupt or truncated: {size} bytes with sha256 {sha256[:12]}..., "
                             f"its manifest records {expected['bytes']} bytes with sha256 {expected['sha256'][:12]}...")


def _read_faiss(url: str, expected: dict) -> faiss.Index:
    if not storage.exists(url):
        raise FileNotFoundError(f"index file {url} is missing")
    with tempfile.TemporaryDirectory(prefix="dml-index-") as tmp:
        local = storage.local_path(url) if storage.is_local(url) else os.path.join(tmp, "index.faiss")
        digest = hashlib.sha256()
        with storage.open_read(url) as src, _sink(local, copy=not storage.is_local(url)) as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        _check_file(url, os.path.getsize(local), digest.hexdigest(), expected)
        try:
            return faiss.read_index(local)
        except RuntimeError as e:
            raise IndexFileError(f"index file {url} could not be read by FAISS: {str(e).splitlines()[-1]}") from e


def _sink(path: str, copy: bool):
    """Where the bytes being hashed go: a local copy for FAISS to read, or nowhere (already local)."""
    return open(path, "wb") if copy else _Discard()


class _Discard(io.RawIOBase):
    def write(self, b) -> int:
        return len(b)


def _read_ids(url: str, expected: dict) -> np.ndarray:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"index ids file {url} is missing") from None
    _check_file(url, len(data), hashlib.sha256(data).hexdigest(), expected)
    return np.load(io.BytesIO(data), allow_pickle=False)

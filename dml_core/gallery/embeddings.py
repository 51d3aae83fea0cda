"""Gallery embeddings on storage, one file per dataset shard, resumable shard by shard.

`<root>/galleries/<gallery>/<model_version>/` holds, for the dataset shard at position i of the split,
`embeddings-<i>.npz` (arrays `z`, `ids`, `labels`; read with allow_pickle=False) and its completion record
`embeddings-<i>.done.json` (written after it, with its size and sha256), and `manifest.json`, written last,
once every shard is done. A backfill started again embeds only the shards without a valid record.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dml_core import storage
from dml_core.training.embed import Embeddings, embed_batches

if TYPE_CHECKING:
    from dml_core.data.manifest import Manifest

GALLERIES = "galleries"
MANIFEST_FILE = "manifest.json"
DTYPES = ("float32", "float16")


class GalleryError(ValueError):
    """Gallery embeddings that are missing, incomplete or do not match their records."""


@dataclass(frozen=True)
class ShardTask:
    """One dataset shard to embed: its position in the split, URL and recorded sample count."""

    index: int
    url: str
    count: int

    @property
    def file(self) -> str:
        return f"embeddings-{self.index:06d}.npz"

    @property
    def record(self) -> str:
        return f"embeddings-{self.index:06d}.done.json"


def gallery_url(root: str, gallery: str, model_version: str) -> str:
    return storage.join(root, GALLERIES, gallery, model_version)


def shard_tasks(manifest: "Manifest", split: str = "gallery") -> list[ShardTask]:
    return [ShardTask(i, url, count) for i, (url, count) in enumerate(manifest.shards(split))]


def embed_shard(model: torch.nn.Module, task: ShardTask, out_dir: str, *, dtype: str = "float32",
                batch_size: int = 256, device: torch.device | str = "cpu", on_error: str = "raise",
                endpoint_url: str | None = None, attempt: str = "", side_model: torch.nn.Module | None = None) -> dict:
    """Embed one dataset shard with `model` into `out_dir`, then write its completion record; returns it.
    `side_model`: also store its embedding of every item as `side` (the side-info of a transformation)."""
    from dml_core.data.eval_reader import EvalReader

    if dtype not in DTYPES:
        raise ValueError(f"gallery dtype must be one of {DTYPES}, got {dtype!r}")
    spec = getattr(model, "spec", {}) or {}
    reader = EvalReader([task.url], counts=[task.count], rank=0, world_size=1, batch_size=batch_size,
                        num_workers=0, endpoint_url=endpoint_url, on_error=on_error,
                        image_size=spec.get("image_size"), channels=spec.get("in_channels"))
    arrays = {}
    if side_model is None:
        emb = embed_batches(model, reader, device, allow_empty=True)
    else:  # one read of the shard for both models
        emb = embed_batches(WithSideInfo(model, side_model), reader, device, allow_empty=True)
        dim = emb.z.shape[1] - side_model.spec["embedding_dim"] if emb.z.numel() else 0
        arrays["side"] = emb.z[:, dim:].numpy().astype(dtype)
        emb = Embeddings(emb.z[:, :dim], emb.labels, emb.ids)
    buf = io.BytesIO()
    np.savez(buf, z=emb.z.numpy().astype(dtype), ids=emb.ids.numpy(), labels=emb.labels.numpy(), **arrays)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(out_dir, task.file), data)
    record = {"index": task.index, "shard": task.url, "file": task.file, "count": int(emb.ids.shape[0]),
              "skipped": task.count - int(emb.ids.shape[0]), "dim": int(emb.z.shape[1]), "dtype": dtype,
              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "attempt": attempt}
    storage.write_bytes_atomic(storage.join(out_dir, task.record), json.dumps(record).encode())
    return record


class WithSideInfo(torch.nn.Module):
    """The gallery model's embedding and the side model's, side by side, from one decoded batch."""

    def __init__(self, model: torch.nn.Module, side: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.side = model, side
        inputs = [(m.spec.get("image_size"), m.spec.get("in_channels")) for m in (model, side)]
        if inputs[0] != inputs[1]:
            raise GalleryError(f"the side-info model reads images of (size, channels) {inputs[1]}, the gallery model "
                               f"{inputs[0]}: train the side model at the gallery model's input")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(images).float(), self.side(images).float()], dim=1)


def done_records(out_dir: str, tasks: list[ShardTask]) -> dict[int, dict]:
    """The completion records of `tasks` whose embedding file is there with the recorded size (one listing)."""
    fs, path = storage.filesystem(out_dir)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    sizes = {info["name"].rsplit("/", 1)[-1]: info["size"] for info in fs.ls(path, detail=True)}
    out = {}
    for t in tasks:
        if t.record not in sizes:
            continue
        record = json.loads(storage.read_bytes(storage.join(out_dir, t.record)))
        if record.get("shard") == t.url and sizes.get(t.file) == record.get("bytes"):
            out[t.index] = record
    return out


def pending(out_dir: str, tasks: list[ShardTask]) -> list[ShardTask]:
    done = done_records(out_dir, tasks)
    return [t for t in tasks if t.index not in done]


def write_manifest(out_dir: str, tasks: list[ShardTask], meta: dict) -> dict:
    """Write `manifest.json` once every shard is done (else GalleryError naming the missing ones)."""
    records = done_records(out_dir, tasks)
    missing = [t.url for t in tasks if t.index not in records]
    if missing:
        raise GalleryError(f"{len(missing)} of {len(tasks)} shards of {out_dir} are not embedded: {missing[:5]}")
    shards = [records[t.index] for t in tasks]
    dims = {r["dim"] for r in shards if r["count"]}
    if len(dims) > 1:
        raise GalleryError(f"shards of {out_dir} disagree on the embedding dimension: {sorted(dims)}")
    manifest = {**meta, "count": sum(r["count"] for r in shards), "skipped": sum(r["skipped"] for r in shards),
                "dim": next(iter(dims), None), "dtype": shards[0]["dtype"] if shards else "float32",
                "shards": [{k: r[k] for k in ("file", "shard", "count", "bytes", "sha256")} for r in shards]}
    storage.write_bytes_atomic(storage.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(out_dir: str) -> dict:
    url = storage.join(out_dir, MANIFEST_FILE)
    if not storage.exists(url):
        raise GalleryError(f"{url} not found: the gallery was not (completely) embedded")
    return json.loads(storage.read_bytes(url))


def read_shard(url: str, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of one gallery `.npz` (no pickles), checked against `sha256` when given."""
    data = storage.read_bytes(url)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise GalleryError(f"{url} does not match its recorded sha256 (corrupt or replaced)")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def load_arrays(out_dir: str, *names: str) -> dict[str, np.ndarray]:
    """Arrays `names` of every shard of a complete gallery, concatenated in shard order; each file checked
    against its recorded sha256. A name no shard stores is left out."""
    parts: dict[str, list] = {n: [] for n in names}
    for shard in read_manifest(out_dir)["shards"]:
        arrays = read_shard(storage.join(out_dir, shard["file"]), shard["sha256"])
        for n in names:
            if n in arrays:
                parts[n].append(arrays[n])
    return {n: np.concatenate(p) for n, p in parts.items() if p}


def load_gallery(out_dir: str) -> Embeddings:
    """Every embedding of a complete gallery, in shard order, as float32 (files checked as `load_arrays`)."""
    a = load_arrays(out_dir, "z", "ids", "labels")
    return Embeddings(torch.from_numpy(a["z"].astype(np.float32)), torch.from_numpy(a["labels"]),
                      torch.from_numpy(a["ids"]))

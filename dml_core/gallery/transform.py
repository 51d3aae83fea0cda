"""A gallery transformed by h (METHODS 6.1): every stored embedding of the old gallery mapped into the new
model's space, shard by shard, without reading an image.

`<root>/galleries/<gallery>/<new version>-transformed/` holds the same files as a backfilled gallery
(`embeddings.py`: one `.npz` per shard with its completion record, `manifest.json` last), each `.npz` with
`z` (h's prediction, L2-normalised), `ids`, `labels` and, for a FastFill h, `log_var` (the order of a partial
backfill). The manifest says where it came from: `transformed_from` (the old gallery) and `transformation`
(h's checkpoint). A rerun after a kill transforms only the shards without a valid record.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch

from dml_core import storage
from dml_core.gallery.embeddings import GALLERIES, GalleryError, ShardTask, read_manifest, read_shard

TRANSFORMED = "-transformed"


def transformed_url(root: str, gallery: str, model_version: str) -> str:
    return storage.join(root, GALLERIES, gallery, model_version + TRANSFORMED)


def source_tasks(source_dir: str) -> list[ShardTask]:
    """One task per shard file of the complete gallery at `source_dir` (its URL is the task's `url`)."""
    manifest = read_manifest(source_dir)
    return [ShardTask(i, storage.join(source_dir, s["file"]), s["count"]) for i, s in enumerate(manifest["shards"])]


def transform_shard(h, task: ShardTask, out_dir: str, *, sha256: str | None = None, dtype: str = "float32",
                    attempt: str = "") -> dict:
    """Map one stored shard of the old gallery (`task.url`) through h into `out_dir`, then write its
    completion record; returns it. The shard's `side` array feeds h's side branch when h has one."""
    from dml_core.training.transformation import apply_transformation

    arrays = read_shard(task.url, sha256)
    side = None
    if h.side_dim:
        if "side" not in arrays:
            raise GalleryError(f"{task.url} stores no side-info, but h was trained with it (side_dim={h.side_dim})")
        side = torch.from_numpy(arrays["side"].astype(np.float32))
    z, log_var = apply_transformation(h, torch.from_numpy(arrays["z"].astype(np.float32)), side)
    out = {"z": z.numpy().astype(dtype), "ids": arrays["ids"], "labels": arrays["labels"]}
    if log_var is not None:
        out["log_var"] = log_var.numpy()
    buf = io.BytesIO()
    np.savez(buf, **out)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(out_dir, task.file), data)
    record = {"index": task.index, "shard": task.url, "file": task.file, "count": int(len(arrays["ids"])),
              "skipped": 0, "dim": int(z.shape[1]), "dtype": dtype, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "attempt": attempt}
    storage.write_bytes_atomic(storage.join(out_dir, task.record), json.dumps(record).encode())
    return record

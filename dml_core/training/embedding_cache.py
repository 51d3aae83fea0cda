"""Embeddings of a dataset split by a frozen model, computed once and cached on storage by content: the
key is the model file's sha256 with the dataset's name, version and split, so a retrained model or a new
dataset version never reads a stale entry, and a rerun (or a second transformation against the same old
model) embeds nothing again. `<run.root>/cache/embeddings/<key>.npz` holds `z`, `labels`, `ids`.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from dml_core import storage
from dml_core.data.sources.base import sha256_file, sha256_json
from dml_core.training.embed import Embeddings, embed_with_config, model_url

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest

CACHE = ("cache", "embeddings")


def cache_url(root: str, checkpoint: str, manifest: "Manifest", split: str) -> str:
    fs, path = storage.filesystem(model_url(checkpoint))
    key = sha256_json([sha256_file(fs, path), manifest.name, manifest.version, split])
    return storage.join(root, *CACHE, f"{key}.npz")


def cached_embeddings(cfg: "Config", checkpoint: str, manifest: "Manifest", split: str = "train") -> Embeddings:
    """`split` embedded by `checkpoint`'s model (`embed_with_config`), from the cache when it holds it."""
    url = cache_url(cfg.run.root, checkpoint, manifest, split)
    if storage.exists(url):
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as a:
            return Embeddings(torch.from_numpy(a["z"]), torch.from_numpy(a["labels"]), torch.from_numpy(a["ids"]))
    emb = embed_with_config(cfg, checkpoint, manifest, split)
    buf = io.BytesIO()
    np.savez(buf, z=emb.z.numpy(), labels=emb.labels.numpy(), ids=emb.ids.numpy())
    storage.write_bytes_atomic(url, buf.getvalue())
    return emb

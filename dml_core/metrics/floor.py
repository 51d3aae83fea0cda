"""The raw-pixel floor (METHODS 6): retrieval with the images themselves as embeddings (resized to the
model's input, flattened, L2-normalised), on the same split and with the same metric code as a model.
A model below it is not worth serving; every report shows it beside the model's numbers.

The floor depends only on the dataset version, the split and the input size, so it is computed once and
cached beside the dataset: `<dataset>/floor/<split>-<size>px-<channels>ch.json`.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from dml_core import storage
from dml_core.data.manifest import Manifest

FLOOR_DIR = "floor"
KS = (1, 5, 10)


class RawPixels(nn.Module):
    """The floor's 'model': an image batch -> its flattened, L2-normalised pixels. `spec` tells the readers
    which size and channels to decode at (None: as stored)."""

    def __init__(self, image_size: int | None = None, in_channels: int | None = None) -> None:
        super().__init__()
        self.spec = {"image_size": image_size, "in_channels": in_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1).float(), dim=1)


def floor_url(manifest: Manifest, split: str, image_size: int | None, channels: int | None) -> str:
    size = "native" if image_size is None else f"{image_size}px"
    chans = "native" if channels is None else f"{channels}ch"
    return storage.join(manifest.url, FLOOR_DIR, f"{split}-{size}-{chans}.json")


def pixel_floor(manifest: Manifest, split: str = "eval", *, image_size: int | None = None,
                channels: int | None = None, ks=KS, batch_size: int = 512, num_workers: int = 0,
                endpoint_url: str | None = None, on_error: str = "raise", cache: bool = True) -> dict:
    """Leave-one-out Recall@K and MAP@R of raw pixels on `split`: {"recall_at_k": {"1": ..}, "map_at_r", ...}.
    Read from the cache when it holds every K asked for; computed and cached otherwise."""
    url = floor_url(manifest, split, image_size, channels)
    if cache and storage.exists(url):
        cached = json.loads(storage.read_bytes(url))
        if {str(k) for k in ks} <= set(cached["recall_at_k"]) and cached.get("fingerprint") == manifest.fingerprint:
            return cached
    from dml_core.metrics.retrieval import evaluate_retrieval
    from dml_core.training.embed import embed_split

    z, labels, _ = embed_split(RawPixels(image_size, channels), manifest, split, batch_size=batch_size,
                               num_workers=num_workers, endpoint_url=endpoint_url, on_error=on_error)
    r = evaluate_retrieval(z, labels, ks=tuple(ks))
    out = {"what": "raw pixels: resized, flattened, L2-normalised", "split": split, "image_size": image_size,
           "channels": channels, "dim": int(z.shape[1]),
           "dataset": {"name": manifest.name, "version": manifest.version},
           "fingerprint": manifest.fingerprint, "num_queries": r.num_queries,
           "recall_at_k": {str(k): v for k, v in sorted(r.recall.items())}, "map_at_r": r.map_at_r}
    if cache:
        storage.write_bytes_atomic(url, json.dumps(out, indent=1).encode())
    return out


def floor_score(floor: dict, metric: str) -> float:
    """The floor's value of a gate metric ("recall_at_1" or "map_at_r")."""
    return float(floor["map_at_r"] if metric == "map_at_r" else floor["recall_at_k"][metric.removeprefix("recall_at_")])

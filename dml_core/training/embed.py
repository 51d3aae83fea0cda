"""From a checkpoint to embeddings: load a checkpoint's model, embed a stream of batches, embed a split.

`embed_split` is the one way every stage turns a model and a dataset split into embeddings: the BCT
prototypes of training, the evaluation, and the gallery backfill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from dml_core import storage
from dml_core.training.state import MODEL_FILE
from dml_core.training.step import autocast

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest
    from dml_core.models.head import EmbeddingModel


@dataclass
class Embeddings:
    """Float32 embeddings on the CPU with the labels and stable sample ids of their rows."""

    z: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    def __iter__(self):  # `z, labels, ids = embed_split(...)`
        return iter((self.z, self.labels, self.ids))


def model_url(checkpoint: str) -> str:
    """The model file of a checkpoint given as its directory or as the `.pt` file itself."""
    return checkpoint if checkpoint.endswith(".pt") else storage.join(checkpoint, MODEL_FILE)


def read_model_spec(checkpoint: str) -> dict:
    """The spec of a checkpoint's model (backbone, embedding_dim, image_size, ...), without building it."""
    from dml_core.models.checkpoint import read_checkpoint

    return dict(read_checkpoint(_existing(model_url(checkpoint)))["spec"])


def load_checkpoint_model(checkpoint: str) -> "EmbeddingModel":
    """The model of a checkpoint (directory or model file, local or s3://), weights only, in eval mode."""
    from dml_core.models.checkpoint import load_model

    return load_model(_existing(model_url(checkpoint))).eval()


def _existing(url: str) -> str:
    if not storage.exists(url):
        raise FileNotFoundError(f"no model file at {url}")
    return url


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches: Iterable, device: torch.device | str = "cpu",
                  allow_empty: bool = False) -> Embeddings:
    """Embed every item of `batches` (objects with `.images`, `.labels`, `.ids`: the readers' `Batch`) in
    eval mode; the model's training flag is restored afterwards. No batch at all is an error unless
    `allow_empty` (then the embeddings have 0 rows and 0 columns)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    zs, labels, ids = [], [], []
    try:
        for b in batches:
            with autocast(device):
                z = model(b.images.to(device))
            zs.append(z.float().cpu())
            labels.append(b.labels.cpu())
            ids.append(b.ids.cpu())
    finally:
        model.train(was_training)
    if not zs and allow_empty:
        empty = torch.empty(0, dtype=torch.int64)
        return Embeddings(torch.empty(0, 0), empty, empty.clone())
    if not zs:
        raise ValueError("no batches to embed (empty split?)")
    return Embeddings(torch.cat(zs), torch.cat(labels), torch.cat(ids))


def embed_split(checkpoint: "str | EmbeddingModel", manifest: "Manifest", split: str, *, rank: int = 0,
                world_size: int = 1, batch_size: int = 256, num_workers: int = 0,
                device: torch.device | str = "cpu", endpoint_url: str | None = None,
                on_error: str = "raise") -> Embeddings:
    """Embed `split` of `manifest` with a checkpoint (its URL, or an already loaded model), every item once.

    With `world_size > 1` this rank embeds only its share (disjoint shares that cover the split). Images
    are decoded at the model's own `image_size` / `in_channels`, read from its spec.
    """
    from dml_core.data.eval_reader import EvalReader

    model = load_checkpoint_model(checkpoint) if isinstance(checkpoint, str) else checkpoint
    spec = getattr(model, "spec", {}) or {}
    reader = EvalReader.from_manifest(manifest, split, rank=rank, world_size=world_size, batch_size=batch_size,
                                      num_workers=num_workers, endpoint_url=endpoint_url, on_error=on_error,
                                      image_size=spec.get("image_size"), channels=spec.get("in_channels"))
    return embed_batches(model.to(device), reader, device)


def embed_with_config(cfg: "Config", checkpoint: str, manifest: "Manifest", split: str = "eval") -> Embeddings:
    """`embed_split` in one process with the config's reading options (batch size, loader workers, endpoint,
    `data.on_error`): how the evaluation, the gate and a sweep's trials embed a split."""
    return embed_split(checkpoint, manifest, split, batch_size=cfg.data.eval_batch_size,
                       num_workers=cfg.data.loader_workers, endpoint_url=cfg.storage.endpoint_url,
                       on_error=cfg.data.on_error)

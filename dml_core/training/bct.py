"""Old-model class prototypes for BCT (METHODS.md 3): the OLD model embeds the training set and each class
gets the L2-normalised mean of its old embeddings (also classes the old model never trained on)."""
from __future__ import annotations

from typing import Iterable

import torch

from dml_core.data import storage
from dml_core.training.embed import embed_batches
from dml_core.training.state import MODEL_FILE


def old_model_url(old_checkpoint: str) -> str:
    """The model file of an old checkpoint given as its directory or as the file itself."""
    return old_checkpoint if old_checkpoint.endswith(".pt") else storage.join(old_checkpoint, MODEL_FILE)


def load_old_model(old_checkpoint: str):
    from dml_core.models.checkpoint import load_model

    url = old_model_url(old_checkpoint)
    if not storage.exists(url):
        raise FileNotFoundError(f"loss.bct.old_checkpoint: no model file at {url}")
    return load_model(url)


def old_embedding_dim(old_checkpoint: str) -> int:
    """The old model's embedding dimension, read from its checkpoint spec (no model built)."""
    from dml_core.models.checkpoint import read_checkpoint

    url = old_model_url(old_checkpoint)
    if not storage.exists(url):
        raise FileNotFoundError(f"loss.bct.old_checkpoint: no model file at {url}")
    return int(read_checkpoint(url)["spec"]["embedding_dim"])


def prototype_sums(model: torch.nn.Module, batches: Iterable, num_classes: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the L2-normalised embeddings of `model` over `batches`, and per-class counts
    (float64). Sums from several workers add up (all-reduce) before `prototypes_from_sums`."""
    z, labels, _ = embed_batches(model, batches, device)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels out of range [0, {num_classes}) while building BCT prototypes")
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float64).index_add_(0, labels.long(), zn)
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    return sums, counts


def prototypes_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, D) float32 unit rows = normalised class means; zero rows for classes with no sample."""
    norms = sums.norm(dim=1, keepdim=True)
    if bool(((norms.squeeze(1) == 0) & (counts > 0)).any()):
        raise ValueError("a class has a zero mean old embedding: no prototype direction")
    return (sums / norms.clamp(min=1e-300)).float()


def old_prototypes(old_checkpoint: str, batches: Iterable, num_classes: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_classes, D) prototypes from the old model over `batches` (the training split, unaugmented),
    in one process. Classes absent from the training split get a zero row: they are never BCT targets."""
    model = load_old_model(old_checkpoint).to(device)
    return prototypes_from_sums(*prototype_sums(model, batches, num_classes, device))

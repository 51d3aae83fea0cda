"""Embed a stream of batches with a model (eval mode, no grad): the shared step of BCT prototypes and
evaluation."""
from __future__ import annotations

from typing import Iterable

import torch

from dml_core.training.step import autocast


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches: Iterable, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings float32 on CPU, labels, ids) of every item; `batches` yield objects with
    `.images`, `.labels`, `.ids` (the readers' `Batch`)."""
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
    if not zs:
        raise ValueError("no batches to embed (empty split?)")
    return torch.cat(zs), torch.cat(labels), torch.cat(ids)

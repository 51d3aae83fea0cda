"""The old model's inputs to a run's compatibility terms (METHODS.md 3 and 3.1), built once per worker.

One pass of the old model over the training split gives BCT's class prototypes and, for PC with
`old_embeddings: precomputed`, the table of every training sample's old embedding (each rank embeds its
share; one all-reduce makes the whole table). With `on_the_fly` the old model runs on every batch instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from dml_core.losses.pc import OldEmbeddings, OldEmbeddingTable, OldModelEmbeddings
from dml_core.training.bct import bct_prototypes, old_train_embeddings
from dml_core.training.embed import Embeddings, load_checkpoint_model
from dml_core.training.step import autocast

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest


def pc_mode(cfg: "Config") -> str:
    """`loss.pc.old_embeddings` resolved: auto is precomputed, or on_the_fly when the images are augmented
    (a precomputed embedding is of the un-augmented image)."""
    mode = cfg.loss.pc.old_embeddings
    if mode == "auto":
        return "on_the_fly" if cfg.data.augment else "precomputed"
    return mode


@dataclass
class OldModelInputs:
    """BCT's prototypes (None without loss.bct) and PC's old embeddings (None without loss.pc)."""

    prototypes: torch.Tensor | None = None
    embeddings: OldEmbeddings | None = None

    def feed(self, batches: Iterator) -> Iterator:
        """The training batches, each embedded by the old model first when PC runs it on the fly."""
        return self.embeddings.feed(batches) if isinstance(self.embeddings, OldModelEmbeddings) else batches


def old_model_inputs(cfg: "Config", manifest: "Manifest", rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu") -> OldModelInputs:
    """Everything the loss needs from `loss.bct.old_checkpoint`, with one embedding pass of the split."""
    if cfg.loss.bct is None:
        return OldModelInputs()
    old = old_train_embeddings(cfg, manifest, rank, world_size, device)
    prototypes = bct_prototypes(cfg, manifest, rank, world_size, device, old=old)
    if cfg.loss.pc is None:
        return OldModelInputs(prototypes)
    if pc_mode(cfg) == "precomputed":
        return OldModelInputs(prototypes, old_embedding_table(old, manifest.num_ids, world_size, device))
    model = load_checkpoint_model(cfg.loss.bct.old_checkpoint).to(device)
    return OldModelInputs(prototypes, OldModelEmbeddings(model, autocast=autocast))


def old_embedding_table(old: Embeddings, num_ids: int, world_size: int = 1,
                        device: torch.device | str = "cpu") -> OldEmbeddingTable:
    """Every rank's share of the old embeddings in one table by sample id, the same on every rank."""
    dim = old.z.shape[1]
    full = torch.zeros(num_ids, dim + 1, dtype=torch.float32, device=device)
    ids = old.ids.to(device).long()
    full[ids, :dim] = old.z.to(device, torch.float32)
    full[ids, dim] = 1.0
    if world_size > 1:
        dist.all_reduce(full)  # the shares are disjoint: the sum is the whole split
    known = torch.nonzero(full[:, dim] > 0).flatten()
    return OldEmbeddingTable(full[known, :dim], known, num_ids)

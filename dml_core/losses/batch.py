"""The batch every loss term sees: this rank's anchors, the global batch, and masks built once per step."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import gather_rows, gather_rows_with_meta, is_distributed, sum_over_ranks


def class_index(labels_q: torch.Tensor, labels_k: torch.Tensor):
    """Class index of every anchor and key, and each class's number of keys, in O(B) memory."""
    uniq, inverse = torch.unique(torch.cat([labels_k, labels_q]), return_inverse=True)
    inv_k, inv_q = inverse[: labels_k.shape[0]], inverse[labels_k.shape[0]:]
    return inv_q, inv_k, torch.bincount(inv_k, minlength=uniq.shape[0])


def _check_ids(ids, n: int) -> None:
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] != n:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-D tensor with one id per row of z: got {shape} for {n} rows")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got {ids.dtype}")


@dataclass(eq=False)
class EmbeddingBatch:
    """One step's batch (METHODS.md 1.2). Rows `offset..offset+b` of the keys are this rank's anchors.

    Args:
        q: this rank's L2-normalised embeddings (b, D), with graph.
        k: the global batch's normalised embeddings (B, D), with graph; `q` itself when local.
        labels_q, labels_k: int64 labels of the anchors and the keys (labels_q == labels_k[offset:offset+b]).
        ids_q, ids_k: int64 stable sample ids, or None.
        offset: global row of this rank's first anchor.
        world: number of ranks sharing the batch (1: local, no term communicates); the `ddp_scale` factor.
        group: process group of the few reductions a term adds (TCM's counts, the decomposable E-step).
    """

    q: torch.Tensor
    k: torch.Tensor
    labels_q: torch.Tensor
    labels_k: torch.Tensor
    ids_q: torch.Tensor | None = None
    ids_k: torch.Tensor | None = None
    offset: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def local(cls, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> "EmbeddingBatch":
        """This process's batch alone: checks `z`, normalises it, and never communicates."""
        z, labels, ids = _checked(z, labels, ids)
        q = l2_normalize(z)
        return cls(q, q, labels, labels, ids, ids)

    @classmethod
    def gather(cls, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None,
               group=None) -> "EmbeddingBatch":
        """The global batch of all ranks of `group` in ONE all-gather (embeddings with gradient, labels and
        ids bit-packed beside them). Every rank must pass the same shapes, and ids on all ranks or none."""
        world = dist.get_world_size(group) if is_distributed() else 1
        if world == 1:
            return cls.local(z, labels, ids)
        z, labels, ids = _checked(z, labels, ids)
        q = l2_normalize(z)
        meta = torch.stack([labels] if ids is None else [labels, ids], dim=1)
        k, meta_all = gather_rows_with_meta(q, meta, group)
        offset = dist.get_rank(group) * q.shape[0]
        ids_k = None if ids is None else meta_all[:, 1]
        return cls(q, k, labels, meta_all[:, 0], ids, ids_k, offset, world, group)

    # ---- derived once, on first use ----
    @cached_property
    def _classes(self):
        return class_index(self.labels_q, self.labels_k)

    @cached_property
    def n_pos_q(self) -> torch.Tensor:
        """Each anchor's number of positives (same label, self excluded) in the global batch."""
        inv_q, _, sizes = self._classes
        return sizes[inv_q] - 1

    @cached_property
    def has_neg_q(self) -> torch.Tensor:
        inv_q, _, sizes = self._classes
        return sizes[inv_q] < self.k.shape[0]

    @cached_property
    def has_pos_k(self) -> torch.Tensor:
        """Which items of the global batch have a positive (the same on every rank)."""
        _, inv_k, sizes = self._classes
        return sizes[inv_k] > 1

    @cached_property
    def has_neg_k(self) -> torch.Tensor:
        _, inv_k, sizes = self._classes
        return sizes[inv_k] < self.k.shape[0]

    @cached_property
    def same(self) -> torch.Tensor:
        """(b, B) same-label mask, for dense terms only (the tiled path never builds it)."""
        return self.labels_q[:, None] == self.labels_k[None, :]

    @cached_property
    def not_self(self) -> torch.Tensor:
        """(b, B) mask, False at each anchor's own key."""
        b = self.q.shape[0]
        mask = torch.ones(b, self.k.shape[0], dtype=torch.bool, device=self.q.device)
        rows = torch.arange(b, device=mask.device)
        mask[rows, rows + self.offset] = False
        return mask

    @cached_property
    def positive(self) -> torch.Tensor:
        """(b, B) positive-pair mask: same label, not self."""
        return self.same & self.not_self

    @property
    def anchors(self) -> slice:
        """This rank's rows of the global batch."""
        return slice(self.offset, self.offset + self.q.shape[0])

    # ---- the reductions a term may add (no-ops when local) ----
    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of a detached per-anchor statistic, in global row order."""
        return x.detach() if self.world == 1 else gather_rows(x, self.group)

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.world == 1 else sum_over_ranks(x, self.group)


def _checked(z, labels, ids):
    check_embeddings(z, labels)
    _check_ids(ids, z.shape[0])
    return z, labels.to(z.device).long(), None if ids is None else ids.to(z.device).long()

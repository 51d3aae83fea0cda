"""Positive-congruent (focal) distillation term, METHODS.md section 3.1.

`lambda_pc * mean_i (alpha + beta * 1[old right on i]) * KL(p_old(x_i) || p_new(x_i))` with both
distributions a softmax over the frozen old class prototypes `W_old` (BCT's) at temperature `tau_pc`.
The old model's embedding of each anchor comes from an `OldEmbeddings` source looked up by sample id:
precomputed once per run (`OldEmbeddingTable`) or computed on the fly on the same batch (`OldModelEmbeddings`).
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.nn.functional as F

from dml_core.checks import check_embeddings
from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.bct import _check_label_range


class OldEmbeddings(Protocol):
    """The old model's L2-normalised embeddings (b, D) of the samples `ids` (b,)."""

    def lookup(self, ids: torch.Tensor) -> torch.Tensor: ...


def check_params(lambda_pc: float, alpha: float, beta: float, tau_pc: float) -> None:
    """PC's hyper-parameters (the constructor and the config loader both use this)."""
    if tau_pc <= 0:
        raise ValueError(f"tau_pc must be > 0, got {tau_pc}")
    for name, value in (("lambda_pc", lambda_pc), ("alpha", alpha), ("beta", beta)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if alpha == 0 and beta == 0:
        raise ValueError("alpha and beta are both 0: every sample would have weight 0")


def focal_kl_rows(q: torch.Tensor, old_q: torch.Tensor, labels: torch.Tensor, old_weights: torch.Tensor,
                  alpha: float, beta: float, tau_pc: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row focal weight times KL(p_old || p_new), the rows' KL, and where the old model is right.

    `q`, `old_q`: normalised new (with graph) and old embeddings (b, D); `old_weights` (C, D) prototypes.
    """
    w = old_weights.to(q.dtype)
    log_p_new = F.log_softmax(q @ w.T / tau_pc, dim=1)
    old_logits = old_q.to(q.dtype) @ w.T / tau_pc
    log_p_old = F.log_softmax(old_logits, dim=1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=1)
    right = old_logits.argmax(dim=1) == labels
    return (alpha + beta * right.to(q.dtype)) * kl, kl.detach(), right


class OldEmbeddingTable:
    """Precomputed old embeddings, one row per sample id (normalised here, in `z`'s dtype). Not loss state:
    it is rebuilt from the old model at every start, so checkpoints stay small."""

    def __init__(self, z: torch.Tensor, ids: torch.Tensor, num_ids: int | None = None) -> None:
        check_embeddings(z, ids, name="old_embeddings")
        ids = ids.to(z.device).long()
        num_ids = int(ids.max()) + 1 if num_ids is None else int(num_ids)
        self.table = torch.zeros(num_ids, z.shape[1], dtype=z.dtype, device=z.device)
        self.table[ids] = F.normalize(z, dim=1)
        self.known = torch.zeros(num_ids, dtype=torch.bool, device=z.device)
        self.known[ids] = True

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.table.device).long()
        bad = (ids < 0) | (ids >= self.table.shape[0])
        bad[~bad] = ~self.known[ids[~bad]]
        if bool(bad.any()):
            raise ValueError(f"no precomputed old embedding for sample ids {ids[bad][:5].tolist()} (first 5 "
                             f"shown); the table covers {int(self.known.sum())} ids of the training split")
        return self.table[ids]


class OldModelEmbeddings:
    """The frozen old model run on each training batch (`observe`) before the loss looks its rows up.

    Kept out of the module tree on purpose: its weights are neither trained nor saved with the loss.
    """

    def __init__(self, model: torch.nn.Module, autocast=None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast
        self._ids: torch.Tensor | None = None
        self._z: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, images: torch.Tensor, ids: torch.Tensor) -> None:
        """Embed this step's `images` (the rows of `ids`) with the old model."""
        with self.autocast(images.device) if self.autocast else contextlib.nullcontext():
            z = self.model(images)
        self._ids, self._z = ids.long(), F.normalize(z.float(), dim=1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self._ids is None or not torch.equal(self._ids, ids.to(self._ids.device).long()):
            raise ValueError("the old model did not embed this batch: call observe(images, ids) on the same "
                             "batch before the loss")
        return self._z

    def feed(self, batches):
        """`batches` of (images, labels, ids), each embedded by the old model before it is yielded."""
        for images, labels, ids in batches:
            self.observe(images, ids)
            yield images, labels, ids


class PositiveCongruent(EmbeddingLoss):
    """PC distillation (METHODS 3.1) against frozen old class prototypes `old_weights` (C, D).

    Rows are independent, so like BCT it needs no collective: the local row sum is scaled by
    `ddp_scale(global batch size)`. Needs sample ids (the old embeddings are looked up by id). Stats:
    `pc_kl` (mean KL) and `old_right` (fraction the old model classifies right), this rank's means.
    """

    def __init__(self, old_weights: torch.Tensor, old_embeddings: OldEmbeddings, lambda_pc: float = 1.0,
                 alpha: float = 1.0, beta: float = 5.0, tau_pc: float = 0.05) -> None:
        super().__init__()
        check_embeddings(old_weights, name="old_weights")
        check_params(lambda_pc, alpha, beta, tau_pc)
        self.lambda_pc, self.alpha, self.beta, self.tau_pc = float(lambda_pc), float(alpha), float(beta), float(tau_pc)
        self.register_buffer("old_weights", old_weights.detach().clone())
        self.old_embeddings = old_embeddings

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        num_classes, old_dim = self.old_weights.shape
        if batch.q.shape[1] != old_dim:
            raise ValueError(f"new model embeds in D={batch.q.shape[1]}, old model in D={old_dim}; "
                             f"PC needs equal dims")
        if batch.ids_q is None:
            raise ValueError("PositiveCongruent needs sample ids: the old embeddings are looked up by id")
        _check_label_range(batch.labels_k, num_classes, term="PC")
        old_q = self.old_embeddings.lookup(batch.ids_q)
        if old_q.shape != batch.q.shape:
            raise ValueError(f"old embeddings of shape {tuple(old_q.shape)} for a batch of {tuple(batch.q.shape)}; "
                             f"PC needs the old model's embedding dim to equal the new one's")
        rows, kl, right = focal_kl_rows(batch.q, old_q.to(batch.q.device), batch.labels_q, self.old_weights,
                                        self.alpha, self.beta, self.tau_pc)
        b = batch.q.shape[0]
        self.stats = {"pc_kl": float(kl.sum()) / b, "old_right": float(right.sum()) / b}
        return self.lambda_pc * rows.sum() * ddp_scale(batch.k.shape[0], batch.world)

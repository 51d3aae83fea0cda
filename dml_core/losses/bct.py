"""Backward-compatible training (BCT) influence term, METHODS.md section 3.

`lambda_bct * CE(W_old . phi_new(x) / tau_bct, y)` with `W_old` frozen. Choice: the new embedding is
L2-normalised before the product (the notation of METHODS: embeddings are normalised), so with
prototype rows of unit norm the logits are cosine similarities over `tau_bct`. Rows of `W_old` are used
as given (a trained classifier head need not be normalised; `class_prototypes` returns unit rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch


def prototype_sums(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class sums (num_classes, D) of the L2-normalised `embeddings` and per-class counts, both float64.

    Sums and counts of several workers add up (one all-reduce of `cat([sums, counts[:, None]], 1)`)
    before `prototypes_from_sums`.
    """
    check_embeddings(embeddings, labels, name="old_embeddings")
    labels = labels.to(embeddings.device).long()
    _check_label_range(labels, num_classes)
    zn = l2_normalize(embeddings.double())
    sums = torch.zeros(num_classes, zn.shape[1], dtype=torch.float64, device=zn.device).index_add_(0, labels, zn)
    return sums, torch.bincount(labels, minlength=num_classes).double()


def prototypes_from_sums(sums: torch.Tensor, counts: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    """L2-normalised class means (float64 unit rows) from `prototype_sums`.

    A class with no sample is an error unless `allow_empty` (e.g. classes absent from the training split),
    in which case its row is zero (logit 0).
    """
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty) and not allow_empty:
        raise ValueError(f"classes {empty[:10].tolist()} (first 10 shown) have no samples: cannot build their "
                         f"prototypes (pass allow_empty=True to give them a zero row)")
    norms = sums.double().norm(dim=1, keepdim=True)
    bad = torch.nonzero((norms.squeeze(1) == 0) & (counts > 0)).flatten()
    if len(bad):
        raise ValueError(f"classes {bad[:10].tolist()} (first 10 shown) have a zero mean embedding: "
                         f"no direction to use")
    return sums.double() / norms.clamp(min=torch.finfo(torch.float64).tiny)


def class_prototypes(old_embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     allow_empty: bool = False) -> torch.Tensor:
    """L2-normalised class means (num_classes, D) of the OLD model's embeddings (rows normalised first),
    computed in float64 and returned in the embeddings' dtype. A class with no sample is an error unless
    `allow_empty` (zero row)."""
    sums, counts = prototype_sums(old_embeddings, labels, num_classes)
    return prototypes_from_sums(sums, counts, allow_empty).to(old_embeddings.dtype)


def _check_label_range(labels: torch.Tensor, num_classes: int, term: str = "BCT") -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels out of range [0, {num_classes}): {labels[bad][:5].tolist()} (first 5 shown); "
                         f"{term} needs one old prototype per class")


def check_params(lambda_bct: float, tau_bct: float) -> None:
    """BCT's hyper-parameters (the constructor and the config loader both use this)."""
    if tau_bct <= 0:
        raise ValueError(f"tau_bct must be > 0, got {tau_bct}")
    if lambda_bct < 0:
        raise ValueError(f"lambda_bct must be >= 0, got {lambda_bct}")


class BCT(EmbeddingLoss):
    """BCT influence loss against frozen old class weights `old_weights` (C, D).

    Each row's cross entropy is independent of the others, so BCT needs no collective: the local row sum is
    scaled by `ddp_scale(global batch size)`, making DDP's average the exact global-batch mean. Its stat
    `bct_ce` is this rank's mean (average it over ranks for the global one).
    """

    def __init__(self, old_weights: torch.Tensor, lambda_bct: float = 1.0, tau_bct: float = 0.05) -> None:
        super().__init__()
        check_embeddings(old_weights, name="old_weights")
        check_params(lambda_bct, tau_bct)
        self.lambda_bct, self.tau_bct = float(lambda_bct), float(tau_bct)
        self.register_buffer("old_weights", old_weights.detach().clone())

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        num_classes, old_dim = self.old_weights.shape
        if batch.q.shape[1] != old_dim:
            raise ValueError(f"new model embeds in D={batch.q.shape[1]}, old model in D={old_dim}; "
                             f"BCT needs equal dims")
        _check_label_range(batch.labels_k, num_classes)  # the global labels: every rank raises alike
        logits = batch.q @ self.old_weights.to(batch.q.dtype).T / self.tau_bct
        ce = F.cross_entropy(logits, batch.labels_q, reduction="sum")
        self.stats = {"bct_ce": float(ce.detach()) / batch.q.shape[0]}
        return self.lambda_bct * ce * ddp_scale(batch.k.shape[0], batch.world)

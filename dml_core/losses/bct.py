"""Backward-compatible training (BCT) influence term, METHODS.md section 3.

`lambda_bct * CE(W_old . phi_new(x) / tau_bct, y)` with `W_old` frozen. Choice: the new embedding is
L2-normalised before the product (the notation of METHODS: embeddings are normalised), so with
prototype rows of unit norm the logits are cosine similarities over `tau_bct`. Rows of `W_old` are used
as given (a trained classifier head need not be normalised; `class_prototypes` returns unit rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale, is_distributed
from dml_core.losses.base import EmbeddingLoss


def class_prototypes(old_embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     allow_empty: bool = False) -> torch.Tensor:
    """L2-normalised class means (num_classes, D) of the OLD model's embeddings (rows normalised first).

    A class with no sample is an error unless `allow_empty`, in which case its row is zero (logit 0).
    """
    check_embeddings(old_embeddings, labels, name="old_embeddings")
    labels = labels.to(old_embeddings.device).long()
    _check_label_range(labels, num_classes)
    zn = l2_normalize(old_embeddings)
    sums = torch.zeros(num_classes, zn.shape[1], dtype=zn.dtype, device=zn.device).index_add_(0, labels, zn)
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty) and not allow_empty:
        raise ValueError(f"classes {empty[:10].tolist()} (first 10 shown) have no samples: cannot build their "
                         f"prototypes (pass allow_empty=True to give them a zero row)")
    norms = sums.norm(dim=1, keepdim=True)
    if bool(((norms.squeeze(1) == 0) & (counts > 0)).any()):
        bad = torch.nonzero((norms.squeeze(1) == 0) & (counts > 0)).flatten()[:10].tolist()
        raise ValueError(f"classes {bad} (first 10 shown) have a zero mean embedding: no direction to use")
    return sums / norms.clamp(min=torch.finfo(zn.dtype).tiny)


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels out of range [0, {num_classes}): {labels[bad][:5].tolist()} (first 5 shown); "
                         f"BCT needs one old prototype per class")


class BCT(EmbeddingLoss):
    """BCT influence loss against frozen old class weights `old_weights` (C, D).

    Each row's cross entropy is independent of the others, so no gather is needed: the local row sum is
    scaled by `ddp_scale(global batch size)`, making DDP's average the exact global-batch mean.
    """

    def __init__(self, old_weights: torch.Tensor, lambda_bct: float = 1.0, tau_bct: float = 0.05) -> None:
        super().__init__()
        check_embeddings(old_weights, name="old_weights")
        if tau_bct <= 0:
            raise ValueError(f"tau_bct must be > 0, got {tau_bct}")
        if lambda_bct < 0:
            raise ValueError(f"lambda_bct must be >= 0, got {lambda_bct}")
        self.lambda_bct, self.tau_bct = float(lambda_bct), float(tau_bct)
        self.register_buffer("old_weights", old_weights.detach().clone())

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        check_embeddings(z, labels)
        num_classes, old_dim = self.old_weights.shape
        if z.shape[1] != old_dim:
            raise ValueError(f"new model embeds in D={z.shape[1]}, old model in D={old_dim}; BCT needs equal dims")
        labels = labels.to(z.device).long()
        _check_label_range(labels, num_classes)
        logits = l2_normalize(z) @ self.old_weights.to(z.dtype).T / self.tau_bct
        ce = F.cross_entropy(logits, labels, reduction="sum")
        n = torch.tensor([float(z.shape[0]), float(ce.detach())], dtype=torch.float64, device=z.device)
        if is_distributed():
            dist.all_reduce(n)
        n_global, ce_global = n.tolist()
        self.stats = {"bct_ce": ce_global / n_global}
        return self.lambda_bct * ce * ddp_scale(n_global)

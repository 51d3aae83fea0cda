"""Supervised InfoNCE (METHODS.md 1.1) with exact distributed semantics (1.2) and a tiled path (1.3).

    L_i = - mean_{p in P(i)} [ s_ip / tau - log sum_{a in A(i)} exp(s_ia / tau) ]

`P(i)`: the other items of the global batch with anchor i's label; `A(i)`: every other item. The loss is
the mean of `L_i` over the anchors that have a positive. The two-view self-supervised case (SimCLR-style)
is the same loss with `labels` = pair ids (both views of an item share its id).
"""
from __future__ import annotations

import torch

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale, gather_no_grad, gather_with_grad, local_slice
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.tiled import compute_dtype, positive_counts, tiled_info_nce_sum


def dense_info_nce_rows(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1) -> torch.Tensor:
    """Per-anchor rows from the full `b x B` logits (plain autograd); 0 for anchors without a positive.

    `q` (b, D) are normalised anchors at global rows `offset..offset+b` of the normalised keys `k` (B, D).
    """
    dtype = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = q.to(dtype) @ k.to(dtype).t() / tau
        rows = torch.arange(q.shape[0], device=q.device)
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[rows, rows + offset] = False
        positive = (labels_q[:, None] == labels_k[None, :]) & not_self
        lse = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
        n_pos = positive.sum(dim=1)
        pos_mean = torch.where(positive, logits, 0.0).sum(dim=1) / n_pos.clamp(min=1)
        return torch.where(n_pos > 0, lse - pos_mean, 0.0)


def _no_positive_error(n: int) -> ValueError:
    return ValueError(
        f"InfoNCE: no anchor in the batch of {n} has a positive (every label occurs once); "
        "supervised mode needs at least two items sharing a label (pair ids in two-view mode)"
    )


def info_nce_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised InfoNCE of one process's batch (METHODS.md 7): mean over anchors that have a positive.

    `z` (N, D) raw embeddings (L2-normalised here), `labels` (N,) integers. Returns a scalar tensor.
    """
    check_embeddings(z, labels)
    zn = l2_normalize(z)
    rows = dense_info_nce_rows(zn, zn, labels, labels, 0, tau)
    n_valid = int((positive_counts(labels, labels)[2] > 0).sum())
    if n_valid == 0:
        raise _no_positive_error(z.shape[0])
    return rows.sum() / n_valid


class InfoNCE(EmbeddingLoss):
    """Supervised InfoNCE over the global batch; returns this worker's share (METHODS.md 1.2).

    Each rank normalises its `z`, gathers the global batch with gradient, computes the rows of its own
    anchors and scales their sum by `world_size / n_valid_global`, so that DDP's gradient averaging gives
    exactly the gradient of the single-process global-batch loss, also when some anchors have no positive.
    For self-supervised two-view training pass the pair id of each item as its label.

    tau: temperature. tile_size: anchor rows per tile on the tiled path. tiled_above: the tiled path
    (never materialises B x B, METHODS.md 1.3) is used when the global batch B exceeds this; 0 forces it.
    """

    def __init__(self, tau: float = 0.1, tile_size: int = 1024, tiled_above: int = 8192) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"InfoNCE: tau must be > 0, got {tau}")
        if tile_size < 1:
            raise ValueError(f"InfoNCE: tile_size must be >= 1, got {tile_size}")
        self.tau, self.tile_size, self.tiled_above = float(tau), int(tile_size), int(tiled_above)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        check_embeddings(z, labels)
        q = l2_normalize(z)
        k = gather_with_grad(q)
        labels_k = gather_no_grad(labels)
        offset = local_slice(q.shape[0]).start
        # Every rank sees the same gathered labels, so they agree on n_valid without communicating.
        valid_global = positive_counts(labels_k, labels_k)[2] > 0
        n_valid = int(valid_global.sum())
        if n_valid == 0:
            raise _no_positive_error(k.shape[0])
        n_local = int(valid_global[offset: offset + q.shape[0]].sum())
        tiled, scale = k.shape[0] > self.tiled_above, ddp_scale(n_valid)
        if tiled:
            loss = tiled_info_nce_sum(q, k, labels, labels_k, offset, self.tau, self.tile_size, scale)
        else:
            loss = dense_info_nce_rows(q, k, labels, labels_k, offset, self.tau).sum() * scale
        self.stats = {
            "anchors_with_positive": float(n_valid),
            "anchors_with_positive_local": float(n_local),
            "global_batch": float(k.shape[0]),
            "tiled": float(tiled),
        }
        return loss

"""Supervised InfoNCE (METHODS.md 1.1) with exact distributed semantics (1.2) and a tiled path (1.3).

    L_i = - mean_{p in P(i)} [ s_ip / tau - log sum_{a in A(i)} exp(s_ia / tau) ]

`P(i)`: the other items of the global batch with anchor i's label; `A(i)`: every other item. The loss is
the mean of `L_i` over the anchors that have a positive. The two-view self-supervised case (SimCLR-style)
is the same loss with `labels` = pair ids (both views of an item share its id).
"""
from __future__ import annotations

import torch

from dml_core.checks import check_int, check_positive, embedding_inputs
from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.tiled import compute_dtype, tiled_info_nce_sum


def _dense_rows(batch: EmbeddingBatch, tau: float) -> torch.Tensor:
    """Per-anchor rows from the full `b x B` logits (plain autograd); 0 for anchors without a positive."""
    q, k, not_self, positive = batch.q, batch.k, batch.not_self, batch.positive
    dtype = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = q.to(dtype) @ k.to(dtype).t() / tau
        lse = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
        n_pos = batch.n_pos_q
        pos_mean = torch.where(positive, logits, 0.0).sum(dim=1) / n_pos.clamp(min=1)
        return torch.where(n_pos > 0, lse - pos_mean, 0.0)


def dense_info_nce_rows(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1) -> torch.Tensor:
    """Per-anchor rows from the full `b x B` logits (plain autograd); 0 for anchors without a positive.

    `q` (b, D) are normalised anchors at global rows `offset..offset+b` of the normalised keys `k` (B, D).
    """
    return _dense_rows(EmbeddingBatch(q, k, labels_q, labels_k, offset=offset), tau)


def _no_positive_error(n: int) -> ValueError:
    return ValueError(
        f"InfoNCE: no anchor in the batch of {n} has a positive (every label occurs once); "
        "supervised mode needs at least two items sharing a label (pair ids in two-view mode)"
    )


def _check_params(tau, tile_size, tiled_above, owner: str) -> tuple[float, int, int]:
    return (check_positive(tau, "tau", owner), check_int(tile_size, "tile_size", owner, 1),
            check_int(tiled_above, "tiled_above", owner, 0))


def info_nce_loss(z, labels, tau: float = 0.1, tile_size: int = 1024, tiled_above: int = 8192) -> torch.Tensor:
    """Supervised InfoNCE of one process's batch (METHODS.md 7): mean over anchors that have a positive.

    `z` (N, D) raw embeddings (L2-normalised here), `labels` (N,) integers; tensors, NumPy arrays or lists.
    Returns a scalar tensor. Above `tiled_above` items (0 forces it) the tiled path computes the same loss
    without ever building the N x N logits (METHODS.md 1.3), `tile_size` anchor rows at a time.
    """
    tau, tile_size, tiled_above = _check_params(tau, tile_size, tiled_above, "info_nce_loss")
    batch = EmbeddingBatch.local(*embedding_inputs(z, labels))
    n_valid = int(batch.has_pos_k.sum())
    if n_valid == 0:
        raise _no_positive_error(batch.k.shape[0])
    if batch.k.shape[0] > tiled_above:
        return tiled_info_nce_sum(batch.q, batch.k, batch.labels_q, batch.labels_k, 0, tau, tile_size,
                                  1.0 / n_valid)
    return _dense_rows(batch, tau).sum() / n_valid


class InfoNCE(EmbeddingLoss):
    """Supervised InfoNCE over the batch; returns this rank's share (METHODS.md 1.2).

    The rows of this rank's anchors against the global batch, their sum scaled by `world / n_valid_global`,
    so that DDP's gradient averaging gives exactly the gradient of the single-process global-batch loss,
    also when some anchors have no positive. For self-supervised two-view training pass the pair id of
    each item as its label.

    tau: temperature. tile_size: anchor rows per tile on the tiled path. tiled_above: the tiled path
    (never materialises B x B, METHODS.md 1.3) is used when the global batch B exceeds this; 0 forces it.
    """

    def __init__(self, tau: float = 0.1, tile_size: int = 1024, tiled_above: int = 8192) -> None:
        super().__init__()
        self.tau, self.tile_size, self.tiled_above = _check_params(tau, tile_size, tiled_above, "InfoNCE")

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        # Every rank sees the same global labels, so they agree on n_valid without communicating.
        n_valid = int(batch.has_pos_k.sum())
        if n_valid == 0:
            raise _no_positive_error(batch.k.shape[0])
        tiled, scale = batch.k.shape[0] > self.tiled_above, ddp_scale(n_valid, batch.world)
        if tiled:
            loss = tiled_info_nce_sum(batch.q, batch.k, batch.labels_q, batch.labels_k, batch.offset, self.tau,
                                      self.tile_size, scale)
        else:
            loss = _dense_rows(batch, self.tau).sum() * scale
        self.stats = {
            "anchors_with_positive": float(n_valid),
            "anchors_with_positive_local": float((batch.n_pos_q > 0).sum()),
            "global_batch": float(batch.k.shape[0]),
            "tiled": float(tiled),
        }
        return loss

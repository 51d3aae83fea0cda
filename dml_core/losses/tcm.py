"""Threshold-consistent margin (TCM) regulariser, METHODS.md section 2.

Penalises positive pairs whose cosine similarity falls below `m_pos` and negative pairs above
`m_neg`; each term is a mean over its hard pairs only. Add it to a base loss: `InfoNCE() + TCM()`.
Pairs are ordered pairs (i, j), i != j (the mean over ordered pairs equals the mean over unordered ones,
since s_ij = s_ji); `hard_pos` / `hard_neg` therefore count ordered pairs.

Above `tiled_above` keys (METHODS 1.3) the b x B similarity is never built: one pass over row tiles counts
the hard pairs and sums their hinges, making each sum's gradient as it goes
(`dml_core.losses.tiled_pairs.tiled_hinge_sums`); the means' weights, known once the global counts are,
apply in backward.
"""
from __future__ import annotations

import torch

from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch
from dml_core.losses.tiled_pairs import tiled_hinge_sums


def check_params(m_pos: float, m_neg: float, lambda_pos: float, lambda_neg: float) -> None:
    """TCM's hyper-parameters (the constructor and the config loader both use this)."""
    for name, value in (("m_pos", m_pos), ("m_neg", m_neg)):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"TCM margin {name} must be a cosine similarity in [-1, 1], got {value}")
    for name, value in (("lambda_pos", lambda_pos), ("lambda_neg", lambda_neg)):
        if value < 0:
            raise ValueError(f"TCM weight {name} must be >= 0, got {value}")


def _hard_pair_sums(batch: EmbeddingBatch, m_pos: float, m_neg: float):
    """The b x B path: sums of the hinge terms of this rank's anchors against the batch (with graph), and
    the hard-pair counts (float64): (sum_pos, sum_neg, (count_pos, count_neg))."""
    s = batch.q @ batch.k.T
    hard_pos = batch.positive & (s <= m_pos)
    hard_neg = ~batch.same & (s >= m_neg)  # a different label is never the anchor itself
    zero = s.new_zeros(())
    sum_pos = torch.where(hard_pos, m_pos - s, zero).sum()
    sum_neg = torch.where(hard_neg, s - m_neg, zero).sum()
    return sum_pos, sum_neg, torch.stack([hard_pos.sum(), hard_neg.sum()]).double()


def _check_tiles(tile_size: int) -> None:
    if tile_size < 1:
        raise ValueError(f"TCM: tile_size must be >= 1, got {tile_size}")


class _Terms:
    """The two hinge sums of this rank's anchors, `sum_pos` and `sum_neg` (with graph), and `totals`
    (count_pos, count_neg, sum_pos, sum_neg), float64 and detached. Dense (b x B) at or below `tiled_above`
    keys, row tiles above."""

    def __init__(self, batch: EmbeddingBatch, m_pos: float, m_neg: float, tile_size: int, tiled_above: int):
        if batch.k.shape[0] < 2:
            raise ValueError(f"TCM needs at least 2 embeddings to form a pair, got {batch.k.shape[0]}")
        self.tiled = batch.k.shape[0] > tiled_above
        if self.tiled:
            self.sum_pos, self.sum_neg, counts = tiled_hinge_sums(
                batch.q, batch.k, batch.labels_q, batch.labels_k, batch.offset, m_pos, m_neg, tile_size)
        else:
            self.sum_pos, self.sum_neg, counts = _hard_pair_sums(batch, m_pos, m_neg)
        self.totals = torch.cat([counts, torch.stack([self.sum_pos, self.sum_neg]).detach().double()])

    def weighted(self, w_pos: float, w_neg: float) -> torch.Tensor:
        return w_pos * self.sum_pos + w_neg * self.sum_neg


def tcm_loss(z, labels, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
             lambda_neg: float = 1.0, tile_size: int = 1024, tiled_above: int = 8192) -> torch.Tensor:
    """METHODS.md 2 on one process: the TCM value of batch `z` (L2-normalised here) as a 0-dim tensor.

    Accepts tensors or arrays; the result supports `float()` and `backward()`. Above `tiled_above` rows the
    pairs go through row tiles of `tile_size` (never N x N).
    """
    check_params(m_pos, m_neg, lambda_pos, lambda_neg)
    _check_tiles(tile_size)
    batch = EmbeddingBatch.local(torch.as_tensor(z), torch.as_tensor(labels))
    terms = _Terms(batch, m_pos, m_neg, tile_size, tiled_above)
    n_pos, n_neg = terms.totals[:2].tolist()
    return terms.weighted(lambda_pos / max(n_pos, 1.0), lambda_neg / max(n_neg, 1.0))


class TCM(EmbeddingLoss):
    """TCM regulariser with the distributed semantics of METHODS.md 1.2.

    This rank's anchors against the batch. Each rank scales its sum of hard-pair terms by
    `ddp_scale(global hard-pair count)` (one all-reduce of four numbers when distributed), so DDP's gradient
    average is the exact gradient of the global-batch TCM. `stats`: `hard_pos`, `hard_neg` (global
    ordered-pair counts) and `tcm_pos`, `tcm_neg` (the global values of the two means, before the lambdas).
    tile_size / tiled_above: the tiled path (METHODS 1.3) above `tiled_above` keys, as InfoNCE's.
    """

    def __init__(self, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
                 lambda_neg: float = 1.0, tile_size: int = 1024, tiled_above: int = 8192) -> None:
        super().__init__()
        check_params(m_pos, m_neg, lambda_pos, lambda_neg)
        _check_tiles(tile_size)
        self.m_pos, self.m_neg = m_pos, m_neg
        self.lambda_pos, self.lambda_neg = lambda_pos, lambda_neg
        self.tile_size, self.tiled_above = int(tile_size), int(tiled_above)

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        terms = _Terms(batch, self.m_pos, self.m_neg, self.tile_size, self.tiled_above)
        g_pos, g_neg, g_sum_pos, g_sum_neg = batch.sum_over_ranks(terms.totals).tolist()
        loss = terms.weighted(self.lambda_pos * ddp_scale(max(g_pos, 1.0), batch.world),
                              self.lambda_neg * ddp_scale(max(g_neg, 1.0), batch.world))
        self.stats = {
            "hard_pos": g_pos, "hard_neg": g_neg,
            "tcm_pos": g_sum_pos / max(g_pos, 1.0), "tcm_neg": g_sum_neg / max(g_neg, 1.0),
            "tiled": float(terms.tiled),
        }
        return loss

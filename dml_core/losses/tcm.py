"""Threshold-consistent margin (TCM) regulariser, METHODS.md section 2.

Penalises positive pairs whose cosine similarity falls below `m_pos` and negative pairs above
`m_neg`; each term is a mean over its hard pairs only. Add it to a base loss: `InfoNCE() + TCM()`.
Pairs are ordered pairs (i, j), i != j (the mean over ordered pairs equals the mean over unordered ones,
since s_ij = s_ji); `hard_pos` / `hard_neg` therefore count ordered pairs.
"""
from __future__ import annotations

import torch

from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch


def check_params(m_pos: float, m_neg: float, lambda_pos: float, lambda_neg: float) -> None:
    """TCM's hyper-parameters (the constructor and the config loader both use this)."""
    for name, value in (("m_pos", m_pos), ("m_neg", m_neg)):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"TCM margin {name} must be a cosine similarity in [-1, 1], got {value}")
    for name, value in (("lambda_pos", lambda_pos), ("lambda_neg", lambda_neg)):
        if value < 0:
            raise ValueError(f"TCM weight {name} must be >= 0, got {value}")


def _hard_pair_sums(batch: EmbeddingBatch, m_pos: float, m_neg: float):
    """Sums of the hinge terms of this rank's anchors against the batch (with graph), and the hard-pair
    counts (integer tensors): (sum_pos, sum_neg, count_pos, count_neg)."""
    if batch.k.shape[0] < 2:
        raise ValueError(f"TCM needs at least 2 embeddings to form a pair, got {batch.k.shape[0]}")
    s = batch.q @ batch.k.T
    hard_pos = batch.positive & (s <= m_pos)
    hard_neg = ~batch.same & (s >= m_neg)  # a different label is never the anchor itself
    zero = s.new_zeros(())
    sum_pos = torch.where(hard_pos, m_pos - s, zero).sum()
    sum_neg = torch.where(hard_neg, s - m_neg, zero).sum()
    return sum_pos, sum_neg, hard_pos.sum(), hard_neg.sum()


def tcm_loss(z, labels, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
             lambda_neg: float = 1.0) -> torch.Tensor:
    """METHODS.md 2 on one process: the TCM value of batch `z` (L2-normalised here) as a 0-dim tensor.

    Accepts tensors or arrays; the result supports `float()` and `backward()`.
    """
    check_params(m_pos, m_neg, lambda_pos, lambda_neg)
    batch = EmbeddingBatch.local(torch.as_tensor(z), torch.as_tensor(labels))
    sum_pos, sum_neg, n_pos, n_neg = _hard_pair_sums(batch, m_pos, m_neg)
    return lambda_pos * sum_pos / n_pos.clamp(min=1) + lambda_neg * sum_neg / n_neg.clamp(min=1)


class TCM(EmbeddingLoss):
    """TCM regulariser with the distributed semantics of METHODS.md 1.2.

    This rank's anchors against the batch. Each rank scales its sum of hard-pair terms by
    `ddp_scale(global hard-pair count)` (one all-reduce of four numbers when distributed), so DDP's gradient
    average is the exact gradient of the global-batch TCM. `stats`: `hard_pos`, `hard_neg` (global
    ordered-pair counts) and `tcm_pos`, `tcm_neg` (the global values of the two means, before the lambdas).
    """

    def __init__(self, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
                 lambda_neg: float = 1.0) -> None:
        super().__init__()
        check_params(m_pos, m_neg, lambda_pos, lambda_neg)
        self.m_pos, self.m_neg = m_pos, m_neg
        self.lambda_pos, self.lambda_neg = lambda_pos, lambda_neg

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        sum_pos, sum_neg, n_pos, n_neg = _hard_pair_sums(batch, self.m_pos, self.m_neg)
        totals = torch.stack([n_pos.double(), n_neg.double(), sum_pos.detach().double(),
                              sum_neg.detach().double()])
        g_pos, g_neg, g_sum_pos, g_sum_neg = batch.sum_over_ranks(totals).tolist()
        loss = (self.lambda_pos * sum_pos * ddp_scale(max(g_pos, 1.0), batch.world)
                + self.lambda_neg * sum_neg * ddp_scale(max(g_neg, 1.0), batch.world))
        self.stats = {
            "hard_pos": g_pos, "hard_neg": g_neg,
            "tcm_pos": g_sum_pos / max(g_pos, 1.0), "tcm_neg": g_sum_neg / max(g_neg, 1.0),
        }
        return loss

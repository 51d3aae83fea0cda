"""Threshold-consistent margin (TCM) regulariser, METHODS.md section 2.

Penalises positive pairs whose cosine similarity falls below `m_pos` and negative pairs above
`m_neg`; each term is a mean over its hard pairs only. Add it to a base loss: `InfoNCE() + TCM()`.
Pairs are ordered pairs (i, j), i != j (the mean over ordered pairs equals the mean over unordered ones,
since s_ij = s_ji); `hard_pos` / `hard_neg` therefore count ordered pairs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dml_core.checks import check_embeddings, l2_normalize
from dml_core.distributed import ddp_scale, gather_no_grad, gather_with_grad, is_distributed, local_slice
from dml_core.losses.base import EmbeddingLoss


def _check_params(m_pos: float, m_neg: float, lambda_pos: float, lambda_neg: float) -> None:
    for name, value in (("m_pos", m_pos), ("m_neg", m_neg)):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"TCM margin {name} must be a cosine similarity in [-1, 1], got {value}")
    for name, value in (("lambda_pos", lambda_pos), ("lambda_neg", lambda_neg)):
        if value < 0:
            raise ValueError(f"TCM weight {name} must be >= 0, got {value}")


def _hard_pair_sums(zn_local, zn_all, labels_local, labels_all, offset, m_pos, m_neg):
    """Sums of the hinge terms and hard-pair counts for rows `zn_local` against `zn_all`.

    `offset` is the position of the first local row in the global batch (to exclude i == j).
    Returns (sum_pos, sum_neg) with graph and (count_pos, count_neg) as integer tensors.
    """
    s = zn_local @ zn_all.T
    b = zn_local.shape[0]
    not_self = torch.ones_like(s, dtype=torch.bool)
    rows = torch.arange(b, device=s.device)
    not_self[rows, rows + offset] = False
    same = labels_local[:, None] == labels_all[None, :]
    hard_pos = same & not_self & (s <= m_pos)
    hard_neg = ~same & not_self & (s >= m_neg)
    zero = s.new_zeros(())
    sum_pos = torch.where(hard_pos, m_pos - s, zero).sum()
    sum_neg = torch.where(hard_neg, s - m_neg, zero).sum()
    return sum_pos, sum_neg, hard_pos.sum(), hard_neg.sum()


def tcm_loss(z, labels, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
             lambda_neg: float = 1.0) -> torch.Tensor:
    """METHODS.md 2 on one process: the TCM value of batch `z` (L2-normalised here) as a 0-dim tensor.

    Accepts tensors or arrays; the result supports `float()` and `backward()`.
    """
    z = torch.as_tensor(z)
    labels = torch.as_tensor(labels)
    check_embeddings(z, labels)
    _check_params(m_pos, m_neg, lambda_pos, lambda_neg)
    if z.shape[0] < 2:
        raise ValueError(f"TCM needs at least 2 embeddings to form a pair, got {z.shape[0]}")
    labels = labels.to(z.device)
    zn = l2_normalize(z)
    sum_pos, sum_neg, n_pos, n_neg = _hard_pair_sums(zn, zn, labels, labels, 0, m_pos, m_neg)
    return lambda_pos * sum_pos / n_pos.clamp(min=1) + lambda_neg * sum_neg / n_neg.clamp(min=1)


class TCM(EmbeddingLoss):
    """TCM regulariser with the distributed semantics of METHODS.md 1.2.

    Local anchors are compared with the global batch gathered with gradient. Each rank scales its sum of
    hard-pair terms by `ddp_scale(global hard-pair count)`, so DDP's gradient average is the exact
    gradient of the global-batch TCM. `stats`: `hard_pos`, `hard_neg` (global ordered-pair counts) and
    `tcm_pos`, `tcm_neg` (the global values of the two means, before the lambdas).
    """

    def __init__(self, m_pos: float = 0.9, m_neg: float = 0.5, lambda_pos: float = 1.0,
                 lambda_neg: float = 1.0) -> None:
        super().__init__()
        _check_params(m_pos, m_neg, lambda_pos, lambda_neg)
        self.m_pos, self.m_neg = m_pos, m_neg
        self.lambda_pos, self.lambda_neg = lambda_pos, lambda_neg

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        check_embeddings(z, labels)
        labels = labels.to(z.device)
        zn = l2_normalize(z)
        zn_all = gather_with_grad(zn)
        labels_all = gather_no_grad(labels)
        if zn_all.shape[0] < 2:
            raise ValueError(f"TCM needs at least 2 embeddings in the global batch, got {zn_all.shape[0]}")
        offset = local_slice(zn.shape[0]).start
        sum_pos, sum_neg, n_pos, n_neg = _hard_pair_sums(
            zn, zn_all, labels, labels_all, offset, self.m_pos, self.m_neg)
        totals = torch.stack([n_pos.double(), n_neg.double(), sum_pos.detach().double(),
                              sum_neg.detach().double()])
        if is_distributed():
            dist.all_reduce(totals)
        g_pos, g_neg, g_sum_pos, g_sum_neg = totals.tolist()
        loss = (self.lambda_pos * sum_pos * ddp_scale(max(g_pos, 1.0))
                + self.lambda_neg * sum_neg * ddp_scale(max(g_neg, 1.0)))
        self.stats = {
            "hard_pos": g_pos, "hard_neg": g_neg,
            "tcm_pos": g_sum_pos / max(g_pos, 1.0), "tcm_neg": g_sum_neg / max(g_neg, 1.0),
        }
        return loss

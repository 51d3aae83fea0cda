"""Decomposable contrastive loss (stochastic EM over u_i ~ 1/Z_i), METHODS.md section 1.5.

Minibatch InfoNCE estimates log Z_i with a biased log(Zhat_i). Writing log Z = min_u (u Z - log u - 1)
makes the objective linear in Z_i, so with a per-sample state zbar_i (a running estimate of Z_i) and
u_i = 1 / zbar_i (or a Gamma draw with that mean), the loss -mean_p s_ip/tau + u_i Zhat_i has a gradient
that is unbiased for the full-data objective.

Choices fixed here:
- Zhat_i is the mean of exp(s_ij / tau) over the batch items with a label different from i's. Anchors
  with no batch negative have no Zhat: they are skipped by both steps.
- Duplicate ids in one global batch (e.g. the two views of a sample in self-supervised mode): their
  Zhat values are averaged (on CPU, in float64, so the result is deterministic) and the id receives ONE
  E-step update; every occurrence then uses the same u.
- The M-step product u_i * Zhat_i is computed as exp(log u_i + log Zhat_i) (log-sum-exp), which stays
  finite for small tau; `zbar` is float64.
- Sampled u (`gamma_shape=a`): one Gamma(a, rate=a*zbar) draw per distinct id of the global batch, in
  ascending id order, from a CPU generator seeded with (seed, step): reproducible, identical on every
  rank, and resumable since `step` is a buffer.
"""
from __future__ import annotations

import math

import torch

from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch


def _rows(batch: EmbeddingBatch, tau: float):
    """Per anchor: the positive term `-mean_p s_ip / tau` and `log Zhat_i` (0 where undefined)."""
    s = (batch.q @ batch.k.T) / tau
    neg, has_neg = ~batch.same, batch.has_neg_q
    n_neg = batch.k.shape[0] - batch.n_pos_q - 1
    zero = s.new_zeros(())
    pos_term = -torch.where(batch.positive, s, zero).sum(1) / batch.n_pos_q.clamp(min=1)
    # rows without a negative keep their finite logits so logsumexp's backward stays finite (then masked)
    masked = torch.where(neg | ~has_neg[:, None], s, torch.full_like(s, -math.inf))
    log_zhat = torch.logsumexp(masked, dim=1) - torch.log(n_neg.clamp(min=1).to(s.dtype))
    return pos_term, torch.where(has_neg, log_zhat, zero)


def decomposable_loss(z, labels, u, tau: float = 0.1) -> torch.Tensor:
    """M-step value on one process for given u: mean over anchors with a positive and a negative of
    `-mean_p s_ip / tau + u_i * Zhat_i` (z L2-normalised here, u one positive value per row)."""
    batch = EmbeddingBatch.local(torch.as_tensor(z), torch.as_tensor(labels))
    z, u = batch.q, torch.as_tensor(u)
    if u.shape != (z.shape[0],):
        raise ValueError(f"u must hold one value per row of z: shape {tuple(u.shape)} for {z.shape[0]} rows")
    pos_term, log_zhat = _rows(batch, tau)
    valid = (batch.n_pos_q > 0) & batch.has_neg_q
    if not bool(valid.any()):
        raise ValueError("no anchor in the batch has both a positive (same label) and a negative")
    rows = pos_term + torch.exp(torch.log(u.to(z.device, z.dtype)) + log_zhat)
    return rows[valid].mean()


class DecomposableLoss(EmbeddingLoss):
    """Stochastic-EM decomposable contrastive loss with per-sample state `zbar` (METHODS.md 1.5).

    `forward(z, labels, ids)` needs the stable sample ids in [0, num_samples). Buffers `zbar` (float64),
    `seen` (bool) and `step` travel in `state_dict()`. Under DDP every rank applies the same E-step from
    the all-gathered (id, Zhat) pairs, and the M-step rows are scaled with `ddp_scale` so that DDP's
    average is the exact global-batch gradient.
    """

    def __init__(self, num_samples: int, tau: float = 0.1, gamma: float = 0.9,
                 gamma_shape: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma (E-step rate) must be in (0, 1], got {gamma}")
        if gamma_shape is not None and gamma_shape <= 0:
            raise ValueError(f"gamma_shape must be > 0 or None, got {gamma_shape}")
        self.num_samples, self.tau, self.gamma = int(num_samples), float(tau), float(gamma)
        self.gamma_shape, self.seed = gamma_shape, int(seed)
        self.register_buffer("zbar", torch.zeros(self.num_samples, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(self.num_samples, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def _check_ids(self, ids: torch.Tensor | None) -> None:
        if ids is None:
            raise ValueError("DecomposableLoss needs the stable sample ids: call loss(z, labels, ids)")
        bad = (ids < 0) | (ids >= self.num_samples)
        if bool(bad.any()):
            raise ValueError(f"ids out of range [0, {self.num_samples}): {ids[bad][:5].tolist()} (first 5 shown)")

    @torch.no_grad()
    def _e_step(self, ids_all: torch.Tensor, zhat_all: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Update zbar for the distinct ids with a Zhat; return log u for every global-batch position."""
        ids_cpu, zhat_cpu, valid_cpu = ids_all.cpu(), zhat_all.cpu().double(), valid.cpu()
        uniq, inverse = torch.unique(ids_cpu, sorted=True, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse[valid_cpu], zhat_cpu[valid_cpu])
        counts = torch.bincount(inverse[valid_cpu], minlength=len(uniq))
        upd = counts > 0
        dev = self.zbar.device
        uid = uniq[upd].to(dev)
        zhat_mean = (sums[upd] / counts[upd]).to(dev)
        first = ~self.seen[uid]
        rate = torch.where(first, torch.ones_like(zhat_mean), torch.full_like(zhat_mean, self.gamma))
        self.zbar[uid] = (1 - rate) * self.zbar[uid] + rate * zhat_mean
        self.seen[uid] = True
        log_zbar = torch.log(self.zbar[uniq.to(dev)]).cpu()
        if self.gamma_shape is None:
            log_u = -log_zbar
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
            a = torch.full((len(uniq),), float(self.gamma_shape), dtype=torch.float64)
            draw = torch._standard_gamma(a, generator=gen).clamp(min=torch.finfo(torch.float64).tiny)
            log_u = torch.log(draw) - math.log(self.gamma_shape) - log_zbar
        self.step += 1
        if len(uid):
            self.stats.update(first_visits=float(first.sum()), zhat_mean=float(zhat_mean.mean()),
                              u_mean=float(torch.exp(log_u[upd]).mean()))
        return log_u[inverse].to(ids_all.device)

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        self._check_ids(batch.ids_k)  # the global ids: every rank raises alike
        pos_term, log_zhat = _rows(batch, self.tau)
        has_pos_all, has_neg_all = batch.has_pos_k, batch.has_neg_k
        n_rows = int((has_pos_all & has_neg_all).sum())
        if n_rows == 0:
            raise ValueError("no anchor in the global batch has both a positive (same label) and a negative; "
                             "check the labels (supervised) or the pair ids (self-supervised)")
        self.stats = {"anchors": float(n_rows)}
        log_zhat_all = batch.gather_rows(log_zhat)  # the one extra all-gather: every rank's Zhat for the E-step
        log_u_all = self._e_step(batch.ids_k, torch.exp(log_zhat_all.double()), has_neg_all)
        valid = (has_pos_all & has_neg_all)[batch.anchors]
        # rows left out must not carry inf (an unseen id with no negative) into backward as 0 * inf
        log_u = torch.where(valid, log_u_all[batch.anchors], 0.0).to(batch.q.dtype)
        rows = pos_term + torch.exp(log_u + log_zhat)
        return torch.where(valid, rows, rows.new_zeros(())).sum() * ddp_scale(n_rows, batch.world)

"""Decomposable contrastive loss (stochastic EM over u_i ~ 1/Z_i), METHODS.md section 1.5.

Minibatch InfoNCE estimates log Z_i with a biased log(Zhat_i). Writing log Z = min_u (u Z - log u - 1)
makes the objective linear in Z_i, so with a per-sample state zbar_i (a running estimate of Z_i) and
u_i = 1 / zbar_i (or a Gamma draw with that mean), the loss -mean_p s_ip/tau + u_i Zhat_i has a gradient
that is unbiased for the full-data objective, PROVIDED u_i does not depend on this batch's Zhat_i.

Order of steps (METHODS 1.5, `order="m_then_e"`, the default): u comes from the state BEFORE this batch
(M-step), and only then is the state updated with this batch's Zhat (E-step). On a sample's first visit
there is no state and zbar_i = Zhat_i of this batch is used (so the first visit's u_i Zhat_i is 1 and its
gradient is that of log Zhat_i, as in minibatch InfoNCE); the E-step then stores it (gamma = 1 on a first
visit). `order="e_then_m"` is the previous order (the E-step first, u from the updated state, SogCLR's
order); it is kept for the bias benchmark only: u_i then correlates with Zhat_i and at gamma = 0.9 the
expected gradient is about as biased as minibatch InfoNCE (benchmarks/decomposable_bias.py).

Default gamma = 0.1 (`DEFAULT_GAMMA`), the best of {0.1, 0.3, 0.5, 0.9} for this order in
benchmarks/decomposable_bias.py (small batch, label noise; BENCHMARKS.md). With u from the state before the
batch, u_i = 1 / zbar_i is independent of this batch's Zhat_i, but 1 / zbar_i is a biased and noisy
estimate of 1 / Z_i unless zbar_i averages many visits: at gamma = 0.9 zbar_i is essentially the previous
visit's single Zhat, E[1 / Zhat] >> 1 / Z, and training ends further from the full-data optimum than plain
minibatch InfoNCE (F - F* 3.8 against 2.3); the gap shrinks monotonically with gamma (0.69 at 0.5, 0.40 at
0.3, 0.12 at 0.1). SogCLR's 0.9 belongs to the other order (e_then_m), where u correlates with Zhat.

Choices fixed here:
- Zhat_i is the mean of exp(s_ij / tau) over the batch items with a label different from i's. Anchors
  with no batch negative have no Zhat: they are skipped by both steps.
- Duplicate ids in one global batch (e.g. the two views of a sample in self-supervised mode): their
  Zhat values are averaged (on CPU, in float64, so the result is deterministic) and the id receives ONE
  E-step update; every occurrence uses the same u (for a first visit: 1 / that average).
- The M-step product u_i * Zhat_i is computed as exp(log u_i + log Zhat_i) (log-sum-exp), which stays
  finite for small tau; `zbar` is float64.
- Sampled u (`gamma_shape=a`): one Gamma(a, rate=a*zbar) draw per distinct id of the global batch, in
  ascending id order, from a CPU generator seeded with (seed, step): reproducible, identical on every
  rank, and resumable since `step` is a buffer.
- Above `tiled_above` keys (METHODS 1.3) the loss never builds the b x B similarity: a first pass over row
  tiles gives log Zhat (no gradient), the E-step state gives u, and a second pass makes the gradient of
  sum_i u_i Zhat_i during forward; the positive term comes from per-class key sums (O(B D)).
"""
from __future__ import annotations

import math
import numbers

import torch

from dml_core.distributed import ddp_scale
from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch, class_index
from dml_core.losses.tiled import compute_dtype
from dml_core.losses.tiled_pairs import tiled_log_neg_mean, tiled_neg_mean_sum

ORDERS = ("m_then_e", "e_then_m")
DEFAULT_GAMMA = 0.1  # the E-step rate: see the module docstring and benchmarks/decomposable_bias.py


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


def _pos_term_from_class_sums(batch: EmbeddingBatch, tau: float) -> torch.Tensor:
    """`-mean_p s_ip / tau` per anchor (0 without a positive) in O(B D): q_i . (its class's key sum - k_i)."""
    inv_q, inv_k, sizes = class_index(batch.labels_q, batch.labels_k)
    k = batch.k
    sums = torch.zeros(sizes.shape[0], k.shape[1], dtype=k.dtype, device=k.device).index_add(0, inv_k, k)
    own = k[batch.anchors]
    pos = (batch.q * (sums[inv_q] - own)).sum(1) / tau
    return -pos / batch.n_pos_q.clamp(min=1)


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(float(tau)) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)


def _as_tensor(x, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor, a NumPy array or a (nested) list of numbers: {err}") from None


def decomposable_loss(z, labels, u, tau: float = 0.1, tile_size: int = 1024,
                      tiled_above: int = 8192) -> torch.Tensor:
    """M-step value on one process for given u: mean over anchors with a positive and a negative of
    `-mean_p s_ip / tau + u_i * Zhat_i` (z L2-normalised here, u one finite positive value per row,
    detached). z, labels and u may be tensors, NumPy arrays or lists; tau must be a finite number > 0.
    Above `tiled_above` rows the pairs go through row tiles of `tile_size` (never N x N)."""
    tau = _check_tau(tau)
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    z, labels, u = _as_tensor(z, "z"), _as_tensor(labels, "labels"), _as_tensor(u, "u")
    if not z.is_floating_point() and not z.is_complex() and z.dtype != torch.bool:
        z = z.to(torch.get_default_dtype())
    batch = EmbeddingBatch.local(z, labels)
    z = batch.q
    if u.dim() != 1 or u.shape[0] != z.shape[0]:
        raise ValueError(f"u must hold one value per row of z: shape {tuple(u.shape)} for {z.shape[0]} rows")
    if u.is_complex() or u.dtype == torch.bool:
        raise TypeError(f"u must be real numbers, got {u.dtype}")
    u = u.detach()
    bad = ~torch.isfinite(u) | (u <= 0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"u must be finite and > 0 (u_i ~ 1/Z_i); rows {rows} (first 5 shown) are "
                         f"{u[rows].tolist()}")
    u = u.to(z.device, torch.float64)  # log u is formed in float64, then cast
    valid = (batch.n_pos_q > 0) & batch.has_neg_q
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("no anchor in the batch has both a positive (same label) and a negative")
    if z.shape[0] > tiled_above:
        pos = torch.where(valid, _pos_term_from_class_sums(batch, tau), 0.0).sum()
        log_w = torch.where(valid, torch.log(u).to(compute_dtype(z.dtype)), -math.inf)
        neg = tiled_neg_mean_sum(z, z, batch.labels_q, batch.labels_k, log_w, 0, tau, tile_size)
        return (pos + neg.to(pos.dtype)) / n_valid
    pos_term, log_zhat = _rows(batch, tau)
    rows = pos_term + torch.exp(torch.log(u).to(log_zhat.dtype) + log_zhat)
    return rows[valid].mean()


class DecomposableLoss(EmbeddingLoss):
    """Stochastic-EM decomposable contrastive loss with per-sample state `zbar` (METHODS.md 1.5).

    `forward(z, labels, ids)` needs the stable sample ids in [0, num_samples). Buffers `zbar` (float64),
    `seen` (bool) and `step` travel in `state_dict()`. Under DDP every rank applies the same E-step from
    the all-gathered (id, Zhat) pairs, and the M-step rows are scaled with `ddp_scale` so that DDP's
    average is the exact global-batch gradient.

    gamma: E-step rate (default DEFAULT_GAMMA, from benchmarks/decomposable_bias.py: see the module
    docstring). order: "m_then_e" (METHODS 1.5: u from the state before this batch) or "e_then_m" (the
    previous order, for the benchmark only). tile_size / tiled_above: as InfoNCE's (METHODS 1.3).
    """

    def __init__(self, num_samples: int, tau: float = 0.1, gamma: float = DEFAULT_GAMMA,
                 gamma_shape: float | None = None, seed: int = 0, order: str = "m_then_e",
                 tile_size: int = 1024, tiled_above: int = 8192) -> None:
        super().__init__()
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        tau = _check_tau(tau)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma (E-step rate) must be in (0, 1], got {gamma}")
        if gamma_shape is not None and not gamma_shape > 0:
            raise ValueError(f"gamma_shape must be > 0 or None, got {gamma_shape}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.num_samples, self.tau, self.gamma = int(num_samples), tau, float(gamma)
        self.gamma_shape, self.seed, self.order = gamma_shape, int(seed), order
        self.tile_size, self.tiled_above = int(tile_size), int(tiled_above)
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
    def _log_u(self, uniq: torch.Tensor, zbar_used: torch.Tensor) -> torch.Tensor:
        """log u of each distinct id (ascending) from the zbar it uses; advances `step`."""
        log_zbar = torch.log(zbar_used).cpu()  # -inf only for an unseen id without a Zhat (row left out)
        if self.gamma_shape is None:
            log_u = -log_zbar
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
            a = torch.full((len(uniq),), float(self.gamma_shape), dtype=torch.float64)
            draw = torch._standard_gamma(a, generator=gen).clamp(min=torch.finfo(torch.float64).tiny)
            log_u = torch.log(draw) - math.log(self.gamma_shape) - log_zbar
        self.step += 1
        return log_u

    @torch.no_grad()
    def _group(self, ids_all: torch.Tensor, zhat_all: torch.Tensor, valid: torch.Tensor):
        """Distinct ids (ascending, CPU), each position's index among them, which have a Zhat, and the mean
        Zhat of those (float64, on CPU so that it is deterministic)."""
        ids_cpu, zhat_cpu, valid_cpu = ids_all.cpu(), zhat_all.cpu().double(), valid.cpu()
        uniq, inverse = torch.unique(ids_cpu, sorted=True, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse[valid_cpu], zhat_cpu[valid_cpu])
        counts = torch.bincount(inverse[valid_cpu], minlength=len(uniq))
        upd = counts > 0
        return uniq, inverse, upd, (sums[upd] / counts[upd]).to(self.zbar.device)

    @torch.no_grad()
    def _e_step(self, uid: torch.Tensor, zhat_mean: torch.Tensor) -> torch.Tensor:
        """zbar <- (1 - gamma) zbar + gamma Zhat (gamma = 1 on a first visit); returns the first-visit mask."""
        first = ~self.seen[uid]
        rate = torch.where(first, torch.ones_like(zhat_mean), torch.full_like(zhat_mean, self.gamma))
        self.zbar[uid] = (1 - rate) * self.zbar[uid] + rate * zhat_mean
        self.seen[uid] = True
        return first

    def _record(self, first: torch.Tensor, zhat_mean: torch.Tensor, log_u: torch.Tensor) -> None:
        if len(zhat_mean):
            self.stats.update(first_visits=float(first.sum()), zhat_mean=float(zhat_mean.mean()),
                              u_mean=float(torch.exp(log_u).mean()))

    @torch.no_grad()
    def _em(self, ids_all: torch.Tensor, zhat_all: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Return log u for every global-batch position and apply the E-step, in `self.order`."""
        uniq, inverse, upd, zhat_mean = self._group(ids_all, zhat_all, valid)
        dev = self.zbar.device
        uniq_dev, uid = uniq.to(dev), uniq[upd].to(dev)
        if self.order == "e_then_m":
            first = self._e_step(uid, zhat_mean)
            zbar_used = self.zbar[uniq_dev]
        else:  # the state before this batch; this batch's Zhat only where there is none yet
            zbar_used = self.zbar[uniq_dev].clone()
            zbar_used[upd.to(dev)] = torch.where(self.seen[uid], self.zbar[uid], zhat_mean)
            first = self._e_step(uid, zhat_mean)
        log_u = self._log_u(uniq, zbar_used)
        self._record(first, zhat_mean, log_u[upd])
        return log_u[inverse].to(ids_all.device)

    def _tiled(self, batch: EmbeddingBatch, valid: torch.Tensor, has_neg_all: torch.Tensor, scale: float):
        """The tiled M-step (METHODS 1.3) and the E-step. In the steady state (order m_then_e, every id of
        the batch seen) u comes from the state alone and ONE pass over the tiles makes the gradient and this
        batch's Zhat (6 B^2 D FLOPs); otherwise a first pass gives log Zhat for u (8 B^2 D)."""
        dtype = compute_dtype(batch.q.dtype)
        pos_term = _pos_term_from_class_sums(batch, self.tau)
        pos = torch.where(valid, pos_term, pos_term.new_zeros(())).sum() * scale
        ids = batch.ids_k.to(self.zbar.device)
        args = (batch.q, batch.k, batch.labels_q, batch.labels_k)
        single = self.order == "m_then_e" and bool(self.seen[ids].all())  # the same on every rank
        if single:
            uniq, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
            log_u = self._log_u(uniq, self.zbar[uniq.to(self.zbar.device)])
            log_u_all = log_u[inverse].to(batch.q.device)
            log_w = torch.where(valid, log_u_all[batch.anchors].to(dtype) + math.log(scale), -math.inf)
            neg, log_zhat = tiled_neg_mean_sum(*args, log_w, batch.offset, self.tau, self.tile_size,
                                               with_log_zhat=True)
            log_zhat_all = batch.gather_rows(log_zhat)  # the one extra all-gather, for the E-step
            _, _, upd, zhat_mean = self._group(batch.ids_k, torch.exp(log_zhat_all.double()), has_neg_all)
            first = self._e_step(uniq[upd].to(self.zbar.device), zhat_mean)
            self._record(first, zhat_mean, log_u[upd])
        else:
            log_zhat = tiled_log_neg_mean(*args, batch.offset, self.tau, self.tile_size)
            log_zhat_all = batch.gather_rows(log_zhat)  # the one extra all-gather: every rank's Zhat
            log_u_all = self._em(batch.ids_k, torch.exp(log_zhat_all.double()), has_neg_all)
            log_w = torch.where(valid, log_u_all[batch.anchors].to(dtype) + math.log(scale), -math.inf)
            neg = tiled_neg_mean_sum(*args, log_w, batch.offset, self.tau, self.tile_size)
        self.stats["single_pass"] = float(single)
        return pos + neg.to(pos.dtype)

    def compute(self, batch: EmbeddingBatch) -> torch.Tensor:
        self._check_ids(batch.ids_k)  # the global ids: every rank raises alike
        has_pos_all, has_neg_all = batch.has_pos_k, batch.has_neg_k
        n_rows = int((has_pos_all & has_neg_all).sum())
        if n_rows == 0:
            raise ValueError("no anchor in the global batch has both a positive (same label) and a negative; "
                             "check the labels (supervised) or the pair ids (self-supervised)")
        tiled = batch.k.shape[0] > self.tiled_above
        self.stats = {"anchors": float(n_rows), "tiled": float(tiled)}
        valid = (has_pos_all & has_neg_all)[batch.anchors]
        scale = ddp_scale(n_rows, batch.world)
        if tiled:
            return self._tiled(batch, valid, has_neg_all, scale)
        pos_term, log_zhat = _rows(batch, self.tau)
        log_zhat_all = batch.gather_rows(log_zhat)  # the one extra all-gather: every rank's Zhat for the E-step
        log_u_all = self._em(batch.ids_k, torch.exp(log_zhat_all.double()), has_neg_all)
        # rows left out must not carry inf (an unseen id with no negative) into backward as 0 * inf
        log_u = torch.where(valid, log_u_all[batch.anchors], 0.0).to(batch.q.dtype)
        rows = pos_term + torch.exp(log_u + log_zhat)
        return torch.where(valid, rows, rows.new_zeros(())).sum() * scale

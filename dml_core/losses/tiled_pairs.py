"""Tiled pair terms for the decomposable loss and TCM (METHODS.md 1.3, 1.5, 2): the same `c x B` row tiles
as tiled InfoNCE, with same-label pairs found by index rather than a b x B mask. Exact values and gradients
in O(c * B + B * D) memory: `tiled_log_neg_mean` / `tiled_neg_mean_sum` (the negatives' mean Zhat_i) and
`tiled_hinge_stats` / `tiled_hinge_sum` (TCM's hard pairs)."""
from __future__ import annotations

import math

import torch

from dml_core.losses.batch import class_index
from dml_core.losses.tiled import _check_args, _operands, _Tiles, compute_dtype


class _SamePairs:
    """The same-label (anchor, key) pairs of a row tile (the anchor's own key included), as index lists
    built in O(their number) from the keys sorted by class, so that a tile needs no c x B label comparison;
    where a tile has many (large classes: more than 1/16 of its pairs) as a c x B bool mask instead."""

    def __init__(self, labels_q, labels_k):
        self.inv_q, inv_k, self.sizes = class_index(labels_q, labels_k)
        self.labels_q, self.labels_k = labels_q, labels_k
        self.perm = torch.argsort(inv_k, stable=True)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes

    def __call__(self, start: int, stop: int):
        """(rows, cols) index tensors, or a bool mask (c, B)."""
        n = self.sizes[self.inv_q[start:stop]]
        total = int(n.sum())
        if total * 16 > (stop - start) * self.labels_k.shape[0]:
            return self.labels_q[start:stop, None] == self.labels_k[None, :]
        dev = n.device
        rows = torch.repeat_interleave(torch.arange(stop - start, device=dev), n, output_size=total)
        ramp = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n, output_size=total)
        first = torch.repeat_interleave(self.starts[self.inv_q[start:stop]], n, output_size=total)
        return rows, self.perm[first + ramp]


def _take(tile: torch.Tensor, where) -> torch.Tensor:
    return tile[where] if isinstance(where, torch.Tensor) else tile[where[0], where[1]]


def _put(tile: torch.Tensor, where, value: float) -> None:
    if isinstance(where, torch.Tensor):
        tile.masked_fill_(where, value)
    else:
        tile[where[0], where[1]] = value


def _neg_logits(tiles: _Tiles, start: int, stop: int, same: _SamePairs) -> torch.Tensor:
    """The tile s / tau of anchors start:stop with every same-label key (the anchor itself too) at -inf."""
    tile = tiles.logits(start, stop)
    _put(tile, same(start, stop), -math.inf)
    return tile


def _neg_counts(labels_q, labels_k) -> torch.Tensor:
    inv_q, _, sizes = class_index(labels_q, labels_k)
    return labels_k.shape[0] - sizes[inv_q]


@torch.no_grad()
def tiled_log_neg_mean(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1,
                       tile_size: int = 1024) -> torch.Tensor:
    """log Zhat_i = log mean_{j: y_j != y_i} exp(s_ij / tau) of each anchor (no gradient), 0 for an anchor
    with no negative; compute dtype. Never builds B x B: the largest temporaries are `tile_size x B`."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    dtype = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qc, kc, qs, shift = _operands(q, k, tau, dtype)
        tiles, same = _Tiles(qs, kc, offset, tile_size), _SamePairs(labels_q, labels_k)
        out = torch.empty(qc.shape[0], dtype=dtype, device=q.device)
        for start, stop in tiles:  # in place in the tile buffer: no second c x B float temporary
            tile = _neg_logits(tiles, start, stop, same)
            if shift:
                row_max = tile.amax(dim=1).clamp_(min=torch.finfo(dtype).min)
                out[start:stop] = tile.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            else:
                out[start:stop] = tile.exp_().sum(dim=1).log_()
        n_neg = _neg_counts(labels_q, labels_k)
        return torch.where(n_neg > 0, out - torch.log(n_neg.clamp(min=1).to(dtype)), torch.zeros_like(out))


class TiledNegMeanSum(torch.autograd.Function):
    """sum_i exp(log_w_i) * Zhat_i over the anchors, Zhat_i = mean_{j: y_j != y_i} exp(s_ij / tau), with
    its gradients made during forward (6 B^2 D FLOPs, one exp per pair). `log_w` is detached (-inf: row
    left out). Each row's product is formed as exp(log_w_i + m_i - log n_i) * sum_j exp(s_ij / tau - m_i)
    with its row maximum m_i where the logits could overflow. Second output: log Zhat_i of every anchor
    (0 without a negative; no gradient), for the E-step that follows."""

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, tau: float, tile_size: int, log_w):
        dtype = compute_dtype(q.dtype)
        want_q, want_k = ctx.needs_input_grad[:2]
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, qs, shift = _operands(q, k, tau, dtype)
            tiles, same = _Tiles(qs, kc, offset, tile_size), _SamePairs(labels_q, labels_k)
            n_neg = _neg_counts(labels_q, labels_k)
            log_n = torch.log(n_neg.clamp(min=1).to(dtype))
            log_a = torch.where(n_neg > 0, log_w.detach().to(dtype), -math.inf) - log_n
            log_zhat = torch.zeros(qc.shape[0], dtype=dtype, device=q.device)
            total = qc.new_zeros((), dtype=torch.float64)
            grad_q = torch.zeros_like(qc) if want_q else None
            grad_k = torch.zeros_like(kc) if want_k else None
            for start, stop in tiles:
                tile = _neg_logits(tiles, start, stop, same)
                la = log_a[start:stop]
                row_max = None
                if shift:
                    row_max = tile.amax(dim=1).clamp_(min=torch.finfo(dtype).min)
                    tile.sub_(row_max[:, None])
                    la = la + row_max
                tile.exp_()
                row_sum = tile.sum(dim=1)
                lz = row_sum.log() - log_n[start:stop]
                log_zhat[start:stop] = lz if row_max is None else lz + row_max
                a = torch.where(torch.isfinite(la), la.exp(), 0.0)  # -inf weight: the row is left out
                total += (row_sum * a).sum().double()
                if want_q:
                    torch.mm(tile, kc, out=grad_q[start:stop]).mul_((a / tau)[:, None])
                if want_k:
                    grad_k.addmm_(tile.t(), qs[start:stop] * a[:, None])
            del tiles
            log_zhat = torch.where(n_neg > 0, log_zhat, 0.0)
        ctx.save_for_backward(grad_q, grad_k)
        ctx.dtypes = q.dtype, k.dtype
        ctx.mark_non_differentiable(log_zhat)
        return total.to(dtype), log_zhat

    @staticmethod
    def backward(ctx, grad_out, _grad_log_zhat):
        grad_q, grad_k = ctx.saved_tensors
        out_q = (grad_q * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        out_k = (grad_k * grad_out).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return out_q, out_k, None, None, None, None, None, None


def tiled_neg_mean_sum(q, k, labels_q, labels_k, log_w, offset: int = 0, tau: float = 0.1,
                       tile_size: int = 1024, with_log_zhat: bool = False):
    """`sum_i exp(log_w_i) * Zhat_i` (see `TiledNegMeanSum`), and with `with_log_zhat` also every anchor's
    log Zhat (detached) from the same pass; the largest temporaries are `tile_size x B`."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    if log_w.shape != (q.shape[0],):
        raise ValueError(f"log_w must hold one value per anchor: shape {tuple(log_w.shape)} for {q.shape[0]}")
    total, log_zhat = TiledNegMeanSum.apply(q, k, labels_q, labels_k, int(offset), float(tau), int(tile_size), log_w)
    return (total, log_zhat) if with_log_zhat else total


def _hinge_tile(tiles: _Tiles, start: int, stop: int, same: _SamePairs, m_pos: float, m_neg: float):
    """Hinge sums and hard-pair counts of anchors start:stop, as four float64 numbers (sum_pos, sum_neg,
    count_pos, count_neg). The c x B float buffer is used in place; the same-label pairs are gathered."""
    s = tiles.logits(start, stop)  # cosine, the anchors' own entries -inf
    where = same(start, stop)
    s_same = _take(s, where)
    s_pos = s_same[(s_same <= m_pos) & (s_same > -math.inf)]  # a positive: same label, not the anchor itself
    _put(s, where, -math.inf)
    count_neg = torch.count_nonzero(s >= m_neg)  # not bool.sum(): that makes an int64 copy of the tile
    sum_neg = s.sub_(m_neg).clamp_(min=0).sum()  # s - m_neg on the hard negatives (0 at equality)
    return torch.stack([(m_pos - s_pos).sum().double(), sum_neg.double(),
                        torch.tensor(float(s_pos.shape[0]), dtype=torch.float64, device=s.device),
                        count_neg.double()])


def _hinge_weights(tiles: _Tiles, start: int, stop: int, same: _SamePairs, m_pos: float, m_neg: float,
                   w_pos: float, w_neg: float) -> torch.Tensor:
    """The c x B tile of d value / d s: -w_pos on hard positives, w_neg on hard negatives (s >= m_neg)."""
    s = tiles.logits(start, stop)
    where = same(start, stop)
    rows, cols = where.nonzero(as_tuple=True) if isinstance(where, torch.Tensor) else where
    s_same = s[rows, cols]
    hard = (s_same <= m_pos) & (s_same > -math.inf)
    s[rows, cols] = -math.inf
    s.ge_(m_neg).mul_(w_neg)
    s[rows[hard], cols[hard]] = -w_pos
    return s


@torch.no_grad()
def tiled_hinge_stats(q, k, labels_q, labels_k, offset: int, m_pos: float, m_neg: float, tile_size: int = 1024):
    """TCM's hinge sums and hard-pair counts of the anchors against the keys, tile by tile (no gradient):
    a float64 tensor (sum_pos, sum_neg, count_pos, count_neg)."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    dtype = compute_dtype(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        tiles = _Tiles(q.detach().to(dtype), k.detach().to(dtype), offset, tile_size)
        same = _SamePairs(labels_q, labels_k)
        out = torch.zeros(4, dtype=torch.float64, device=q.device)
        for start, stop in tiles:
            out += _hinge_tile(tiles, start, stop, same, m_pos, m_neg)
        return out


class TiledHingeSum(torch.autograd.Function):
    """`w_pos * sum_{hard pos} (m_pos - s_ij) + w_neg * sum_{hard neg} (s_ij - m_neg)` over the anchors'
    pairs. The value comes from the first pass (`tiled_hinge_stats`, passed in as `value`); this pass makes
    the gradients from one weight tile per row tile (6 B^2 D FLOPs with the first pass's 2)."""

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, m_pos: float, m_neg: float, w_pos: float,
                w_neg: float, tile_size: int, value: float):
        dtype = compute_dtype(q.dtype)
        want_q, want_k = ctx.needs_input_grad[:2]
        grad_q = grad_k = None
        with torch.autocast(device_type=q.device.type, enabled=False):
            if want_q or want_k:
                qc, kc = q.detach().to(dtype), k.detach().to(dtype)
                tiles, same = _Tiles(qc, kc, offset, tile_size), _SamePairs(labels_q, labels_k)
                grad_q = torch.zeros_like(qc) if want_q else None
                grad_k = torch.zeros_like(kc) if want_k else None
                for start, stop in tiles:
                    weight = _hinge_weights(tiles, start, stop, same, m_pos, m_neg, w_pos, w_neg)
                    if want_q:
                        torch.mm(weight, kc, out=grad_q[start:stop])
                    if want_k:
                        grad_k.addmm_(weight.t(), qc[start:stop])
                del tiles
        ctx.save_for_backward(grad_q, grad_k)
        ctx.dtypes = q.dtype, k.dtype
        return torch.tensor(value, dtype=dtype, device=q.device)

    @staticmethod
    def backward(ctx, grad_out):
        grad_q, grad_k = ctx.saved_tensors
        out_q = (grad_q * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        out_k = (grad_k * grad_out).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return out_q, out_k, None, None, None, None, None, None, None, None, None


def tiled_hinge_sum(q, k, labels_q, labels_k, offset: int, m_pos: float, m_neg: float, w_pos: float,
                    w_neg: float, tile_size: int = 1024, stats: torch.Tensor | None = None):
    """TCM's weighted hinge sums `w_pos * sum_pos + w_neg * sum_neg` through `TiledHingeSum`; `stats` is
    `tiled_hinge_stats(...)` of the same inputs if already computed. Largest temporaries: `tile_size x B`."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    if stats is None:
        stats = tiled_hinge_stats(q, k, labels_q, labels_k, offset, m_pos, m_neg, tile_size)
    value = float(w_pos * stats[0] + w_neg * stats[1])
    return TiledHingeSum.apply(q, k, labels_q, labels_k, int(offset), float(m_pos), float(m_neg),
                               float(w_pos), float(w_neg), int(tile_size), value)

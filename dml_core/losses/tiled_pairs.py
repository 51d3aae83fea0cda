"""Tiled pair terms for the decomposable loss and TCM (METHODS.md 1.3, 1.5, 2): the same `c x B` row tiles
as tiled InfoNCE, with same-label pairs found by index rather than a b x B mask. Exact values and gradients
in O(c * B + B * D) memory: `tiled_log_neg_mean` / `tiled_neg_mean_sum` (the negatives' mean Zhat_i) and
`tiled_hinge_sums` (TCM's hard pairs)."""
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


class TiledHingeSums(torch.autograd.Function):
    """TCM's two hinge sums over the anchors' pairs, `sum_pos = sum_{hard pos} (m_pos - s_ij)` and
    `sum_neg = sum_{hard neg} (s_ij - m_neg)`, and the hard-pair counts, in ONE pass over row tiles whose
    gradients are made during forward (6 B^2 D FLOPs): each sum keeps its own gradient, so the weights that
    the global counts decide later (the means) apply in backward. Hard negatives go through a 0/1 weight
    tile and torch.mm; hard positives through their index lists (or a second weight tile where a tile's
    same-label pairs are many, see `_SamePairs`)."""

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, m_pos: float, m_neg: float, tile_size: int):
        dtype = compute_dtype(q.dtype)
        want_q, want_k = ctx.needs_input_grad[:2]
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc = q.detach().to(dtype), k.detach().to(dtype)
            tiles, same = _Tiles(qc, kc, offset, tile_size), _SamePairs(labels_q, labels_k)
            sums = torch.zeros(4, dtype=torch.float64, device=q.device)  # sum_pos, sum_neg, count_pos, count_neg
            grads = [torch.zeros_like(x) if want else None for x, want in ((qc, want_q), (qc, want_q),
                                                                            (kc, want_k), (kc, want_k))]
            for start, stop in tiles:
                s = tiles.logits(start, stop)  # cosine, the anchors' own entries -inf
                where = same(start, stop)
                _hard_positives(s, where, qc[start:stop], kc, m_pos, sums, grads[0], grads[2], start, stop)
                _put(s, where, -math.inf)
                hard = s >= m_neg
                count = torch.count_nonzero(hard)  # not bool.sum(): that makes an int64 copy of the tile
                weight = s.copy_(hard)
                # The hard negatives' key sums per anchor are its gradient row, and q_i . (their sum) is the
                # sum of its hard s_ij: the hinge sum needs no elementwise pass over the tile (memory-bound).
                key_sums = torch.mm(weight, kc)
                sums[1] += (qc[start:stop].double() * key_sums.double()).sum() - m_neg * count.double()
                sums[3] += count
                if grads[1] is not None:
                    grads[1][start:stop] += key_sums
                if grads[3] is not None:
                    grads[3].addmm_(weight.t(), qc[start:stop])
            del tiles
        ctx.save_for_backward(*[g if g is not None else qc.new_empty(0) for g in grads])
        ctx.dtypes = q.dtype, k.dtype
        ctx.mark_non_differentiable(sums)
        return sums[0].to(dtype), sums[1].to(dtype), sums[2:]

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, _grad_counts):
        gq_pos, gq_neg, gk_pos, gk_neg = ctx.saved_tensors
        out_q = (gq_pos * grad_pos + gq_neg * grad_neg).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        out_k = (gk_pos * grad_pos + gk_neg * grad_neg).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return out_q, out_k, None, None, None, None, None, None


def _add_tile_grads(weight, q_tile, kc, grad_q, grad_k, start: int, stop: int) -> None:
    """d/dq and d/dk of sum_ij weight_ij * q_i . k_j over a row tile."""
    if grad_q is not None:
        grad_q[start:stop] += torch.mm(weight, kc)
    if grad_k is not None:
        grad_k.addmm_(weight.t(), q_tile)


def _hard_positives(s, where, q_tile, kc, m_pos: float, sums, grad_q, grad_k, start: int, stop: int) -> None:
    """Adds the hard positives' hinge sum and count (s_ij <= m_pos, same label, not the anchor itself) of a
    tile to `sums`, and the gradients of their sum of -s_ij."""
    if isinstance(where, torch.Tensor):
        hard = where & (s <= m_pos) & (s > -math.inf)
        sums[2] += torch.count_nonzero(hard)
        sums[0] += torch.where(hard, m_pos - s, 0.0).sum()
        _add_tile_grads(-hard.to(s.dtype), q_tile, kc, grad_q, grad_k, start, stop)
        return
    s_same = s[where[0], where[1]]
    hard = (s_same <= m_pos) & (s_same > -math.inf)
    rows, cols = where[0][hard], where[1][hard]
    sums[2] += rows.shape[0]
    sums[0] += (m_pos - s_same[hard]).sum()
    if grad_q is not None:
        grad_q[start:stop].index_add_(0, rows, kc[cols], alpha=-1)
    if grad_k is not None:
        grad_k.index_add_(0, cols, q_tile[rows], alpha=-1)


def tiled_hinge_sums(q, k, labels_q, labels_k, offset: int, m_pos: float, m_neg: float, tile_size: int = 1024):
    """TCM's hinge sums of the anchors against the keys, tile by tile (see `TiledHingeSums`):
    `(sum_pos, sum_neg, counts)`, the sums with gradients, counts a float64 (count_pos, count_neg).
    Largest temporaries: `tile_size x B`."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    return TiledHingeSums.apply(q, k, labels_q, labels_k, int(offset), float(m_pos), float(m_neg), int(tile_size))

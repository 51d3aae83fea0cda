"""Tiled supervised InfoNCE (METHODS.md 1.3): exact loss and gradients without a B x B matrix.

Row `i` (an anchor at global index `offset + i`) against the keys `k` (the global batch):

    L_i = lse_i - (1/n_i) sum_{p in P(i)} s_ip / tau,   lse_i = log sum_{j != offset+i} exp(s_ij / tau)

The log-sum-exp is the only part that touches all `B` keys: forward computes it tile by tile (`c` anchor
rows at a time) and keeps one number per row; backward recomputes each tile's logits and turns them
straight into softmax weights, `exp(s_ij / tau - lse_i)`. The positive term is linear in the keys, so it
is computed exactly from per-class key sums in O(B * D), with no pair mask.
Extra memory: one `c x B` buffer plus O(B * D) for the key gradient and class sums.

`TiledInfoNCERows` is that method, for any weighting of the rows. A scalar loss (`InfoNCE`) goes
through `TiledInfoNCESum`, which needs no recomputation: its gradients are made during forward.
"""
from __future__ import annotations

import math

import torch

from dml_core.losses.batch import class_index

# Above this bound on |logit| the unshifted exp(logit) could overflow or underflow the compute dtype,
# and each tile subtracts its rows' maxima first (one more pass). Unit rows give |logit| <= 1/tau.
_NO_SHIFT_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs (bf16/fp16 tile math loses too much); the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Tiles:
    """Row tiles of the anchors `qs` (b, D) = q / tau against all keys `k` (B, D), in one `c x B` buffer."""

    def __init__(self, qs, k, offset: int, tile_size: int):
        self.qs, self.k, self.offset, self.tile_size = qs, k, offset, tile_size
        self.buf = qs.new_empty(min(tile_size, qs.shape[0]) * k.shape[0])

    def __iter__(self):
        for start in range(0, self.qs.shape[0], self.tile_size):
            yield start, min(start + self.tile_size, self.qs.shape[0])

    def logits(self, start: int, stop: int) -> torch.Tensor:
        """The tile s / tau of anchors start:stop against every key, with the anchors' own entries -inf."""
        tile = self.buf[: (stop - start) * self.k.shape[0]].view(stop - start, self.k.shape[0])
        torch.mm(self.qs[start:stop], self.k.t(), out=tile)
        tile.diagonal(self.offset + start).fill_(-math.inf)
        return tile


def _row_lse(tiles: _Tiles, start: int, stop: int, shift: bool):
    """log sum_{j != self} exp(s_ij / tau) of anchors start:stop, and the tile left as exp(s_ij / tau - m_i)
    with its row shift `m` (None: 0; the row maxima when `shift`)."""
    tile = tiles.logits(start, stop)
    row_max = None
    if shift:
        # Clamped so that a row whose only key is itself (all -inf) gives exp(-inf) = 0, not NaN.
        row_max = tile.amax(dim=1).clamp_(min=torch.finfo(tile.dtype).min)
        tile.sub_(row_max[:, None])
    lse = tile.exp_().sum(dim=1).log_()
    return (lse if row_max is None else lse.add_(row_max)), tile, row_max


def _no_shift_ok(qc: torch.Tensor, kc: torch.Tensor, tau: float) -> bool:
    bound = float(qc.norm(dim=1).max() * kc.norm(dim=1).max()) / tau if qc.shape[0] else 0.0
    return bound <= _NO_SHIFT_LIMIT.get(qc.dtype, 60.0)


def _operands(q, k, tau: float, dtype: torch.dtype):
    """Detached anchors and keys in the compute dtype, the anchors over tau, and whether tiles need a row shift."""
    qc, kc = q.detach().to(dtype), k.detach().to(dtype)
    return qc, kc, qc / tau, not _no_shift_ok(qc, kc, tau)


def _positives(qs, kc, offset: int, labels_q, labels_k):
    """What the positive term needs, from per-class key sums: (inv_q, inv_k, n_pos, class_sums, pos) with
    pos_i = q_i . (sum of keys of its class - its own key) / tau, the sum of anchor i's positive logits."""
    inv_q, inv_k, sizes = class_index(labels_q, labels_k)
    n_pos = sizes[inv_q] - 1  # anchor i is key offset + i: its own label is counted once among the keys
    class_sums = torch.zeros(sizes.shape[0], kc.shape[1], dtype=kc.dtype, device=kc.device).index_add_(0, inv_k, kc)
    pos = (qs * class_sums[inv_q]).sum(1) - (qs * kc[offset: offset + qs.shape[0]]).sum(1)
    return inv_q, inv_k, n_pos, class_sums, pos


def _rows(lse, positives):
    """InfoNCE rows from the row log-sum-exps; 0 where an anchor has no positive."""
    n_pos, pos = positives[2], positives[4]
    return torch.where(n_pos > 0, lse - pos / n_pos.clamp(min=1), torch.zeros_like(lse))


def _add_positive_grads(grad_q, grad_k, w, qc, kc, offset: int, tau: float, positives) -> None:
    """Add the gradients of -(w_i / (tau n_i)) q_i . (class sum of keys - own key) for row weights w."""
    inv_q, inv_k, n_pos, class_sums, _ = positives
    a = w / n_pos.clamp(min=1) / tau
    if grad_q is not None:
        grad_q -= a[:, None] * (class_sums[inv_q] - kc[offset: offset + qc.shape[0]])
    if grad_k is not None:
        grad_k -= torch.zeros_like(class_sums).index_add_(0, inv_q, a[:, None] * qc)[inv_k]
        grad_k[offset: offset + qc.shape[0]] += a[:, None] * qc


class TiledInfoNCERows(torch.autograd.Function):
    """Per-anchor supervised InfoNCE losses (b,), 0 for anchors without a positive (and zero gradient).

    The rows come out in the compute dtype (float32 for half precision inputs), gradients in the inputs'.
    """

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, tau: float, tile_size: int):
        dtype = compute_dtype(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, qs, shift = _operands(q, k, tau, dtype)
            tiles = _Tiles(qs, kc, offset, tile_size)
            lse = torch.empty(qc.shape[0], dtype=dtype, device=q.device)
            for start, stop in tiles:
                lse[start:stop] = _row_lse(tiles, start, stop, shift)[0]
            del tiles
            rows = _rows(lse, _positives(qs, kc, offset, labels_q, labels_k))

        ctx.save_for_backward(q, k, lse, labels_q, labels_k)
        ctx.offset, ctx.tau, ctx.tile_size = offset, tau, tile_size
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        q, k, lse, labels_q, labels_k = ctx.saved_tensors
        tau, offset, dtype = ctx.tau, ctx.offset, lse.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc = q.detach().to(dtype), k.detach().to(dtype)
            qs = qc / tau
            positives = _positives(qs, kc, offset, labels_q, labels_k)
            valid = positives[2] > 0
            w = torch.where(valid, grad_rows.to(dtype), torch.zeros_like(lse))
            # Rows without a positive get lse = +inf: their softmax weights are exactly 0.
            lse = torch.where(valid, lse, math.inf)
            weighted_qs = qs * w[:, None]
            want_k = ctx.needs_input_grad[1]
            grad_q = torch.zeros_like(qc)
            grad_k = torch.zeros_like(kc) if want_k else None
            tiles = _Tiles(qs, kc, offset, ctx.tile_size)
            for start, stop in tiles:
                softmax = tiles.logits(start, stop).sub_(lse[start:stop, None]).exp_()
                torch.mm(softmax, kc, out=grad_q[start:stop])
                if want_k:
                    grad_k.addmm_(softmax.t(), weighted_qs[start:stop])
            del tiles
            grad_q.mul_((w / tau)[:, None])
            _add_positive_grads(grad_q, grad_k, w, qc, kc, offset, tau, positives)
        return grad_q.to(q.dtype), grad_k.to(k.dtype) if want_k else None, None, None, None, None, None


class TiledInfoNCESum(torch.autograd.Function):
    """`scale` x the sum of the supervised InfoNCE rows: a scalar, with its gradients made during forward.

    A scalar loss needs one number from backward, so each row tile's softmax becomes gradient while it is
    still in memory: 6 B^2 D FLOPs and one exp per pair, where the rows function recomputes the logits
    (8 B^2 D, two exps). Each tile spans all keys (`c x B`); the two gradients add O(B * D).
    """

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, tau: float, tile_size: int, scale: float):
        dtype = compute_dtype(q.dtype)
        want_q, want_k = ctx.needs_input_grad[:2]
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, qs, shift = _operands(q, k, tau, dtype)
            tiles = _Tiles(qs, kc, offset, tile_size)
            positives = _positives(qs, kc, offset, labels_q, labels_k)
            valid = positives[2] > 0
            lse = torch.empty(qc.shape[0], dtype=dtype, device=q.device)
            grad_q = torch.zeros_like(qc) if want_q else None
            grad_k = torch.zeros_like(kc) if want_k else None
            for start, stop in tiles:
                lse[start:stop], exp_tile, row_shift = _row_lse(tiles, start, stop, shift)
                if not (want_q or want_k):
                    continue
                # softmax = exp_tile * exp(shift - lse): fold that row factor and `scale` into the D side.
                log_norm = -lse[start:stop] if row_shift is None else row_shift - lse[start:stop]
                a = torch.where(valid[start:stop], scale * log_norm.exp(), 0.0)
                if want_q:
                    torch.mm(exp_tile, kc, out=grad_q[start:stop]).mul_((a / tau)[:, None])
                if want_k:
                    grad_k.addmm_(exp_tile.t(), qs[start:stop] * a[:, None])
            del tiles
            rows = _rows(lse, positives)
            if want_q or want_k:
                _add_positive_grads(grad_q, grad_k, valid.to(dtype) * scale, qc, kc, offset, tau, positives)
        ctx.save_for_backward(grad_q, grad_k)
        ctx.dtypes = q.dtype, k.dtype
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_q, grad_k = ctx.saved_tensors
        out_q = (grad_q * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        out_k = (grad_k * grad_out).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return out_q, out_k, None, None, None, None, None, None


def _check_args(q, k, labels_q, labels_k, offset: int, tile_size: int) -> None:
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if q.shape[1] != k.shape[1] or offset < 0 or offset + q.shape[0] > k.shape[0]:
        raise ValueError(
            f"anchors q {tuple(q.shape)} at offset {offset} do not fit inside keys k {tuple(k.shape)}"
        )
    if labels_q.shape[0] != q.shape[0] or labels_k.shape[0] != k.shape[0]:
        raise ValueError(
            f"labels do not match: {labels_q.shape[0]} anchor labels for {q.shape[0]} anchors, "
            f"{labels_k.shape[0]} key labels for {k.shape[0]} keys"
        )


def tiled_info_nce_rows(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1, tile_size: int = 1024):
    """Per-anchor supervised InfoNCE rows of anchors `q` (b, D) at global rows `offset..offset+b` of `k` (B, D).

    Both must be L2-normalised; rows of anchors without a positive are 0. Never builds a B x B matrix:
    the largest temporary is `tile_size x B`.
    """
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    return TiledInfoNCERows.apply(q, k, labels_q, labels_k, int(offset), float(tau), int(tile_size))


def tiled_info_nce_sum(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1, tile_size: int = 1024,
                       scale: float = 1.0):
    """`scale * tiled_info_nce_rows(...).sum()`, exactly, through `TiledInfoNCESum` (the faster way to a
    scalar loss); the largest temporary is `tile_size x B`."""
    _check_args(q, k, labels_q, labels_k, offset, tile_size)
    return TiledInfoNCESum.apply(q, k, labels_q, labels_k, int(offset), float(tau), int(tile_size), float(scale))

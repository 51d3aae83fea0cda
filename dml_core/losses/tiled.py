"""Tiled supervised InfoNCE rows (METHODS.md 1.3): exact loss and gradients without a B x B matrix.

Row `i` (an anchor at global index `offset + i`) against the keys `k` (the global batch):

    L_i = lse_i - (1/n_i) sum_{p in P(i)} s_ip / tau,   lse_i = log sum_{j != offset+i} exp(s_ij / tau)

The log-sum-exp is the only part that touches all `B` keys: forward computes it tile by tile (`c` anchor
rows at a time) and keeps one number per row; backward recomputes each tile's logits. The positive term is
linear in the keys, so it is computed exactly from per-class key sums in O(B * D), with no pair mask.
Extra memory: one `c x B` buffer plus O(B * D) for the key gradient and class sums.
"""
from __future__ import annotations

import math

import torch

# Above this bound on |logit| the unshifted exp(logit) could overflow or underflow the compute dtype, and
# each tile subtracts its rows' maxima first (one more pass). Unit rows give |logit| <= 1/tau.
_NO_SHIFT_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision inputs (bf16/fp16 tile math loses too much); the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def positive_counts(labels_q: torch.Tensor, labels_k: torch.Tensor):
    """Class index of every anchor and key, and each anchor's number of positives (self excluded).

    Assumes anchor `i` is key `offset + i`, so its own label is counted once among the keys.
    """
    uniq, inverse = torch.unique(torch.cat([labels_k, labels_q]), return_inverse=True)
    inv_k, inv_q = inverse[: labels_k.shape[0]], inverse[labels_k.shape[0]:]
    counts = torch.bincount(inv_k, minlength=uniq.shape[0])
    return inv_q, inv_k, counts[inv_q] - 1, uniq.shape[0]


def _zero_self(buf: torch.Tensor, offset: int, start: int, value: float) -> None:
    """Set the anchors' own entries (row r, column offset + start + r) of a tile to `value`."""
    rows = buf.shape[0]
    buf[:, offset + start: offset + start + rows].diagonal().fill_(value)


def _tile_exp(buf, qs_tile, k, offset, start, shift):
    """buf <- exp(logits - shift) with the anchors' own entries set to 0; returns the row shifts used."""
    torch.mm(qs_tile, k.t(), out=buf)
    if shift:
        # The own entry (logit 1/tau) must not set the shift; bound it by the rows' other entries.
        _zero_self(buf, offset, start, -math.inf)
        row_max = buf.amax(dim=1)
        buf.sub_(row_max[:, None])
    else:
        row_max = None
    buf.exp_()
    _zero_self(buf, offset, start, 0.0)
    return row_max


class TiledInfoNCERows(torch.autograd.Function):
    """Per-anchor supervised InfoNCE losses (b,), 0 for anchors without a positive (and zero gradient).

    The rows come out in the compute dtype (float32 for half precision inputs), gradients in the inputs'.
    """

    @staticmethod
    def forward(ctx, q, k, labels_q, labels_k, offset: int, tau: float, tile_size: int):
        dtype = compute_dtype(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc = q.detach().to(dtype), k.detach().to(dtype)
            b, big_b = qc.shape[0], kc.shape[0]
            bound = float(qc.norm(dim=1).max() * kc.norm(dim=1).max()) / tau if b else 0.0
            shift = not bound <= _NO_SHIFT_LIMIT.get(dtype, 60.0)
            qs = qc / tau
            lse = torch.empty(b, dtype=dtype, device=q.device)
            buf = torch.empty(min(tile_size, b), big_b, dtype=dtype, device=q.device)
            for start in range(0, b, tile_size):
                stop = min(start + tile_size, b)
                tile = buf[: stop - start]
                row_max = _tile_exp(tile, qs[start:stop], kc, offset, start, shift)
                lse[start:stop] = tile.sum(dim=1).log_()
                if row_max is not None:
                    lse[start:stop] += row_max
            del buf

            inv_q, inv_k, n_pos, num_classes = positive_counts(labels_q, labels_k)
            class_sums = torch.zeros(num_classes, kc.shape[1], dtype=dtype, device=q.device)
            class_sums.index_add_(0, inv_k, kc)
            # Sum of positive logits: q_i . (sum of keys of its class - its own key) / tau.
            pos = (qs * class_sums[inv_q]).sum(1) - (qs * kc[offset: offset + b]).sum(1)
            valid = n_pos > 0
            rows = torch.where(valid, lse - pos / n_pos.clamp(min=1), torch.zeros_like(lse))

        ctx.save_for_backward(q, k, lse, inv_q, inv_k, n_pos)
        ctx.offset, ctx.tau, ctx.tile_size, ctx.shift = offset, tau, tile_size, shift
        ctx.num_classes = num_classes
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        q, k, lse, inv_q, inv_k, n_pos = ctx.saved_tensors
        offset, tau, tile_size, shift = ctx.offset, ctx.tau, ctx.tile_size, ctx.shift
        dtype = lse.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc = q.detach().to(dtype), k.detach().to(dtype)
            b, big_b = qc.shape[0], kc.shape[0]
            valid = n_pos > 0
            w = torch.where(valid, grad_rows.to(dtype), torch.zeros_like(lse))
            qs = qc / tau
            grad_q = torch.empty_like(qc)
            grad_k = torch.zeros_like(kc)
            want_k = ctx.needs_input_grad[1]
            buf = torch.empty(min(tile_size, b), big_b, dtype=dtype, device=q.device)
            for start in range(0, b, tile_size):
                stop = min(start + tile_size, b)
                tile = buf[: stop - start]
                row_max = _tile_exp(tile, qs[start:stop], kc, offset, start, shift)
                # softmax_ij = tile_ij * exp(shift_i - lse_i); fold it and the row weight into the D side.
                log_norm = -lse[start:stop] if row_max is None else row_max - lse[start:stop]
                scale = torch.where(valid[start:stop], w[start:stop] * log_norm.exp(), 0.0)
                torch.mm(tile, kc, out=grad_q[start:stop])
                grad_q[start:stop].mul_((scale / tau)[:, None])
                if want_k:
                    grad_k.addmm_(tile.t(), qs[start:stop] * scale[:, None])
            del buf

            # Positive term: -(w_i / (tau n_i)) q_i . (class sum of keys - own key).
            a = w / n_pos.clamp(min=1) / tau
            class_sums = torch.zeros(ctx.num_classes, kc.shape[1], dtype=dtype, device=q.device)
            class_sums.index_add_(0, inv_k, kc)
            grad_q -= a[:, None] * (class_sums[inv_q] - kc[offset: offset + b])
            weighted_q = torch.zeros_like(class_sums).index_add_(0, inv_q, a[:, None] * qc)
            grad_k -= weighted_q[inv_k]
            grad_k[offset: offset + b] += a[:, None] * qc
        return grad_q.to(q.dtype), grad_k.to(k.dtype) if want_k else None, None, None, None, None, None


def tiled_info_nce_rows(q, k, labels_q, labels_k, offset: int = 0, tau: float = 0.1, tile_size: int = 1024):
    """Per-anchor supervised InfoNCE rows of anchors `q` (b, D) at global rows `offset..offset+b` of `k` (B, D).

    Both must be L2-normalised; rows of anchors without a positive are 0. Never builds a B x B matrix.
    """
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
    return TiledInfoNCERows.apply(q, k, labels_q, labels_k, int(offset), float(tau), int(tile_size))

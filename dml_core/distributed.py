"""The collectives of the losses' opt-in distribution (METHODS.md 1.2), on the tensor API of torch.distributed
(`all_gather_single` / `reduce_scatter_single`: the `*_tensor` names and `torch.distributed.nn` warn in torch 2.13).

Nothing here is called unless a caller asks for it with a process group: a loss communicates only through
a batch made by `EmbeddingBatch.gather` (see `DistributedLoss`), so a loss called on one rank never blocks.
Every collective needs equal shapes on all ranks (the same local batch size, width and dtype): that is the
caller's contract, and no object collective checks it (gloo aborts on unequal sizes: "Received data size
doesn't match expected size").
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def ddp_scale(n_rows_global: int | torch.Tensor, world: int) -> float | torch.Tensor:
    """Factor turning a local row sum into this rank's share of the global mean.

    DDP averages gradients over `world` ranks, so each rank returns `sum(local rows) * world / n_rows_global`;
    the average of those is the global mean, also when the ranks hold different numbers of valid rows.
    """
    return world / n_rows_global


class _GatherRows(torch.autograd.Function):
    """All-gather of `x` (b, D) with gradient, and of int64 `meta` (b, m) without, in ONE collective.

    `meta` travels bit for bit as extra columns of `x`'s dtype. Backward hands each rank the sum over ranks
    of the gradient of its own rows (a reduce-scatter), as the global-batch loss needs.
    """

    @staticmethod
    def forward(ctx, x, meta, group):
        ctx.group, width = group, x.shape[1]
        packed = torch.cat([x, meta.contiguous().view(x.dtype)], dim=1)
        out = packed.new_empty(dist.get_world_size(group) * packed.shape[0], packed.shape[1])
        dist.all_gather_single(out, packed, group=group)
        meta_all = out[:, width:].contiguous().view(meta.dtype)
        ctx.mark_non_differentiable(meta_all)
        return out[:, :width], meta_all

    @staticmethod
    def backward(ctx, grad_all, _):
        grad_all = grad_all.contiguous()
        grad = grad_all.new_empty(grad_all.shape[0] // dist.get_world_size(ctx.group), grad_all.shape[1])
        dist.reduce_scatter_single(grad, grad_all, group=ctx.group)
        return grad, None, None


def gather_rows_with_meta(x: torch.Tensor, meta: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ranks' `x` rows with gradient, all ranks' int64 `meta` rows), concatenated in rank order."""
    return _GatherRows.apply(x, meta.to(device=x.device, dtype=torch.int64), group)


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' rows of `x` (detached statistics), concatenated in rank order."""
    x = x.detach().contiguous()
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    dist.all_gather_single(out, x, group=group)
    return out


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise sum of `x` over ranks (a copy; `x` is left as it was)."""
    out = x.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def average_loss_grads(loss: nn.Module, group=None) -> None:
    """Average the gradients of a loss's own parameters over ranks (one all-reduce), as DDP does for the model's.

    Call it after backward and before the optimizer step, on every rank, when the loss has parameters (e.g.
    `ClipLoss(learn_scale=True)`): each rank's share then gives exactly the single-process gradient (1.2).
    A no-op without a process group or without parameters.
    """
    params = [p for p in loss.parameters() if p.requires_grad]
    if not params or not is_distributed() or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)

"""Thin helpers over torch.distributed, usable with or without an initialised process group.

Every loss follows METHODS.md 1.2: a worker computes the rows of its own anchors against the global
batch gathered *with* gradient, and scales its row sum so that DDP's gradient averaging yields the
gradient of the global-batch loss exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _check_same_shape(x: torch.Tensor) -> None:
    shapes = [None] * world_size()
    dist.all_gather_object(shapes, tuple(x.shape))
    if len(set(shapes)) != 1:
        raise ValueError(f"all ranks must pass tensors of the same shape to a gather, got {shapes}")


def gather_with_grad(x: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, keeping the autograd graph (backward sums grads)."""
    if not is_distributed():
        return x
    if check_shapes:
        _check_same_shape(x)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenate `x` (labels, ids, detached statistics) from all ranks along dim 0."""
    if not is_distributed():
        return x
    if check_shapes:
        _check_same_shape(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def local_slice(local_batch: int) -> slice:
    """Rows of the gathered global batch that belong to this rank (equal local batches)."""
    start = rank() * local_batch
    return slice(start, start + local_batch)


def ddp_scale(n_rows_global: int | torch.Tensor) -> float | torch.Tensor:
    """Factor turning a local row sum into this rank's share of the global mean.

    DDP averages gradients over `world_size` ranks, so each rank returns
    `sum(local rows) * world_size / n_rows_global`; the average of those is the global mean.
    """
    return world_size() / n_rows_global

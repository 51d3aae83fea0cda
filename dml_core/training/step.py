"""One optimisation step: forward (bf16 autocast on CUDA, float32 elsewhere), loss, backward, update.

With a `GradCache` the batch goes through the encoder in chunks (METHODS.md 1.4) and the cache does the
backward; the optimizer and schedule steps stay here either way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op (float32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               ids: torch.Tensor | None, optimizer: torch.optim.Optimizer, scheduler: Any | None = None,
               grad_cache: Any | None = None, step: int | None = None,
               before_update: Callable[[], None] | None = None) -> dict[str, float]:
    """Run one step and return its stats: `loss`, `lr` and the loss's own `stats`.

    `before_update` runs between backward and the optimizer step (e.g. to average the loss's own parameter
    gradients over ranks). Raises FloatingPointError (naming the step) if the loss is not finite, before
    the update is applied.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    lr = float(optimizer.param_groups[0]["lr"])
    if grad_cache is not None:  # the cache runs the encoder under its own autocast_dtype
        value = float(grad_cache.step(images, labels, ids))
        _check_finite(value, step)
    else:
        with autocast(images.device):
            z = model(images)
        loss = loss_fn(z.float(), labels, ids)
        value = float(loss.detach())
        _check_finite(value, step)
        loss.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats = {"loss": value, "lr": lr}
    stats.update({k: float(v) for k, v in getattr(loss_fn, "stats", {}).items()})
    return stats


def _check_finite(value: float, step: int | None) -> None:
    if not math.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise FloatingPointError(f"training loss is {value}{where}; lower train.lr or check the data")

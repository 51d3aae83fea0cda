"""One optimisation step: forward (bf16 autocast on CUDA, float32 elsewhere), loss, backward, update.

With a `GradCache` the batch goes through the encoder in chunks (METHODS.md 1.4) and the cache does the
backward; the optimizer and schedule steps stay here either way.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from dml_core.config import Config

DEFAULT_NAN_HINT = "lower train.lr or check the data"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op (float32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               ids: torch.Tensor | None, optimizer: torch.optim.Optimizer, scheduler: Any | None = None,
               grad_cache: Any | None = None, step: int | None = None,
               before_update: Callable[[], None] | None = None,
               nan_hint: str = DEFAULT_NAN_HINT) -> dict[str, float]:
    """Run one step and return its stats: `loss`, `lr` and the loss's own `stats`.

    `before_update` runs between backward and the optimizer step (e.g. to average the loss's own parameter
    gradients over ranks). Raises FloatingPointError (naming the step, then `nan_hint`) if the embeddings
    or the loss are not finite, before the update is applied.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    lr = float(optimizer.param_groups[0]["lr"])
    if grad_cache is not None:  # the cache runs the encoder under its own autocast_dtype
        value = float(grad_cache.step(images, labels, ids))
        _check_finite(value, step, nan_hint)
    else:
        with autocast(images.device):
            z = model(images)
        if not bool(torch.isfinite(z.detach()).all()):  # the model itself diverged: same cause, same error
            raise FloatingPointError(f"embeddings are not finite{_at(step)}; {nan_hint}")
        loss = loss_fn(z.float(), labels, ids)
        value = float(loss.detach())
        _check_finite(value, step, nan_hint)
        loss.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats = {"loss": value, "lr": lr}
    stats.update({k: float(v) for k, v in getattr(loss_fn, "stats", {}).items()})
    return stats


def _check_finite(value: float, step: int | None, hint: str) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss is {value}{_at(step)}; {hint}")


def _at(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


def nan_suspects(cfg: "Config") -> str:
    """The config values that most often make the loss non-finite, with their values, for that error."""
    lc = cfg.loss
    scale = {"arcface": "s", "cosface": "s", "proxy_anchor": "alpha"}.get(lc.base)  # proxy losses: no tau
    too_high = [f"train.lr={cfg.train.lr:g}"] + ([f"loss.{scale}={getattr(lc, scale):g}"] if scale else [])
    temperatures = [] if scale else [f"loss.tau={lc.tau:g}"]
    if lc.bct is not None:
        temperatures.append(f"loss.bct.tau_bct={lc.bct.tau_bct:g}")
    if lc.pc is not None:
        temperatures.append(f"loss.pc.tau_pc={lc.pc.tau_pc:g}")
    too_low = [f"{' or '.join(temperatures)} too low"] if temperatures else []
    return f"likely causes: {', '.join([' or '.join(too_high) + ' too high', *too_low])}, or the data"

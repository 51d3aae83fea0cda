"""Gradient caching (METHODS.md 1.4): a large contrastive batch through the encoder in chunks.

Phase 1 embeds every chunk without a graph, saving each chunk's RNG state; phase 2 computes the loss on
the detached embeddings and caches dL/dz; phase 3 re-runs each chunk with grad from its saved RNG state
(so dropout draws the same masks) and back-propagates `(z_chunk * dL/dz_chunk).sum()`. The parameter
gradient equals the full-batch gradient; activation memory is that of one chunk.

Exactness needs layers that treat samples independently. BatchNorm using batch statistics (training mode)
normalises each chunk by that chunk's statistics, so `step` refuses such a model unless
`allow_batch_stats=True`; use per-sample normalisation instead (GroupNorm/LayerNorm, or the built-in
backbones' `norm="group"` / `norm="frozen_batch"`). Phase 1 never updates running statistics: each
chunk's statistics enter the running averages once, in phase 3, as in a plain chunk-by-chunk forward.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def _batch_len(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"inputs must be a tensor or a non-empty dict of tensors, got {type(inputs).__name__}")
    lengths = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all input tensors must have the same batch size (dim 0), got {lengths}")
    return next(iter(lengths.values()))


def _split(inputs: Inputs, chunk_size: int) -> list[Inputs]:
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(chunk_size))
    parts = {k: v.split(chunk_size) for k, v in inputs.items()}
    return [{k: parts[k][i] for k in parts} for i in range(len(next(iter(parts.values()))))]


def _device_type(inputs: Inputs) -> str:
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    return first.device.type


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _get_rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if _cuda_devices() else []
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(state: tuple[torch.Tensor, list[torch.Tensor]]):
    """Run the block from a saved RNG state; the outer RNG state is left as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield


def batch_stat_norms(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of `module` that normalise by batch statistics as it is now set
    (training mode, or no running statistics to use); "" names `module` itself."""
    return [name for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or (m.running_mean is None and m.running_var is None))]


@contextlib.contextmanager
def running_stats_kept(module: nn.Module):
    """Inside the block, forwards of `module` in training mode leave the running statistics of its norm
    layers (BatchNorm, InstanceNorm with track_running_stats) as they were: they are restored on exit."""
    saved = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats and m.training:
            bufs = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
            saved.append((bufs, [b.clone() for b in bufs]))
    try:
        yield
    finally:
        with torch.no_grad():
            for bufs, copies in saved:
                for b, c in zip(bufs, copies):
                    b.copy_(c)


class GradCache:
    """Three-phase gradient-cached step for `encoder` (an nn.Module, possibly DDP-wrapped).

    `loss_fn` is an EmbeddingLoss called as `loss_fn(z, labels, ids)` on the whole (local) batch; under DDP
    wrap it in `DistributedLoss` so that it sees the global batch.
    A dict input is split along dim 0 and passed as `encoder(**chunk)`. `step` accumulates parameter
    gradients (zero them before, call the optimizer after) and returns this worker's loss value.
    Under DDP only the last chunk's backward all-reduces. `autocast_dtype` (e.g. torch.bfloat16) runs
    the encoder under autocast; the loss is computed in float32.
    `step` raises ValueError if a BatchNorm layer of the encoder uses batch statistics (training mode): the
    chunked gradient would not be the full-batch one. `allow_batch_stats=True` accepts that (each chunk is
    then normalised by its own statistics, and updates the running statistics once, in phase 3).
    """

    def __init__(self, encoder: nn.Module, loss_fn: nn.Module, chunk_size: int,
                 autocast_dtype: torch.dtype | None = None, allow_batch_stats: bool = False) -> None:
        if int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.encoder, self.loss_fn, self.chunk_size = encoder, loss_fn, int(chunk_size)
        self.autocast_dtype = autocast_dtype
        self.allow_batch_stats = bool(allow_batch_stats)
        self.is_ddp = isinstance(encoder, nn.parallel.DistributedDataParallel)

    def _forward(self, module: nn.Module, chunk: Inputs, device_type: str) -> torch.Tensor:
        ctx = (torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            z = module(**chunk) if isinstance(chunk, Mapping) else module(chunk)
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise ValueError(f"the encoder must return a (batch, D) tensor of embeddings, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        return z

    def step(self, inputs: Inputs, labels: torch.Tensor, ids: torch.Tensor | None = None) -> float:
        n = _batch_len(inputs)
        for name, t in (("labels", labels), ("ids", ids)):
            if t is not None and (t.dim() != 1 or t.shape[0] != n):
                raise ValueError(f"{name} must be 1-D with one entry per input row: {tuple(t.shape)} for {n} rows")
        chunks, device_type = _split(inputs, self.chunk_size), _device_type(inputs)
        inner = self.encoder.module if self.is_ddp else self.encoder
        if not self.allow_batch_stats:
            names = batch_stat_norms(inner)
            if names:
                shown = ", ".join(n or "<encoder>" for n in names[:3]) + (f" and {len(names) - 3} more"
                                                                         if len(names) > 3 else "")
                raise ValueError(
                    f"gradient caching with BatchNorm in training mode ({shown}): each chunk would be normalised "
                    "by its own batch statistics, so the step would differ from the full batch (METHODS.md 1.4). "
                    "Use per-sample normalisation (built-in backbones: norm='group' or norm='frozen_batch'; "
                    "GroupNorm/LayerNorm), put the BatchNorm layers in eval mode, or pass "
                    "allow_batch_stats=True to accept the inexact gradient")

        states, cached = [], []
        with torch.no_grad(), running_stats_kept(inner):  # phase 1: embeddings only, running stats untouched
            for chunk in chunks:
                states.append(_get_rng_state())
                cached.append(self._forward(inner, chunk, device_type))

        z = torch.cat(cached)  # phase 2: loss and dL/dz, in float32 at least
        z = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z).requires_grad_()
        loss = self.loss_fn(z, labels, ids)
        loss.backward()
        if z.grad is None:
            raise ValueError("the loss does not depend on the embeddings: no gradient to cache")
        grads = z.grad.split(self.chunk_size)

        for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):  # phase 3
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if (last or not self.is_ddp) else self.encoder.no_sync()
            with sync, _rng_restored(state):
                z_chunk = self._forward(self.encoder, chunk, device_type)
                if z_chunk.shape != grad.shape:
                    raise RuntimeError(f"chunk {i} embedded to {tuple(z_chunk.shape)} on re-run, "
                                       f"{tuple(grad.shape)} when cached: the encoder is not deterministic in shape")
                (z_chunk.to(grad.dtype) * grad).sum().backward()
        return float(loss.detach())

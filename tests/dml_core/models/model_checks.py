"""Checks shared by the model tests (not a test module itself)."""
from __future__ import annotations

import torch
from torch import nn


def assert_unit_embeddings(z: torch.Tensor, n: int, dim: int, dtype: torch.dtype, atol: float) -> None:
    assert z.shape == (n, dim)
    assert z.dtype == dtype
    assert torch.isfinite(z).all()
    norms = z.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=atol), norms


def assert_grads_reach_all_parameters(model: nn.Module, x: torch.Tensor) -> None:
    """Backprop a random linear function of the output; every parameter must get a finite, non-zero grad."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    (out * weights).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    zero = [n for n, p in model.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert not zero, f"all-zero gradient for {zero[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

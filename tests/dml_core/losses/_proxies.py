"""Shared pieces of the proxy-loss tests: data, and a loss's value with its gradients for given proxies."""
from __future__ import annotations

import torch


def proxy_data(n: int, d: int, c: int, dtype=torch.float64, seed: int = 0, missing: int | None = None):
    """Embeddings (n, d), labels in [0, c) (class `missing` left out when given), proxies (c, d)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor([k for k in range(c) if k != missing])
    labels = classes[torch.randint(0, len(classes), (n,), generator=g)]
    return torch.randn(n, d, generator=g, dtype=dtype), labels, torch.randn(c, d, generator=g, dtype=dtype)


def naive_value_and_grads(fn, z: torch.Tensor, w: torch.Tensor):
    """`fn(z, w)` and its gradients with respect to the embeddings `z` and the proxies `w`."""
    z, w = z.clone().requires_grad_(), w.clone().requires_grad_()
    value = fn(z, w)
    return (value.detach(), *torch.autograd.grad(value, [z, w]))


def loss_value_and_grads(loss, z: torch.Tensor, labels: torch.Tensor, w: torch.Tensor):
    """A loss module's value on (z, labels) with its proxies set to `w` (C, D), and its gradients with respect
    to `z` and the proxies (C, D). Ours hold `proxies` (also inside a sum); pytorch-metric-learning's
    ArcFace/CosFace hold `W` as (D, C), its ProxyAnchor `proxies`."""
    from dml_core.losses.proxies import proxy_parameters

    transposed = hasattr(loss, "W")
    param = loss.W if transposed else (proxy_parameters(loss) or [loss.proxies])[0]
    with torch.no_grad():
        param.data = (w.T if transposed else w).clone().to(param.device)
    z = z.clone().requires_grad_()
    value = loss(z, labels)
    dz, dw = torch.autograd.grad(value, [z, param])
    return value.detach(), dz, dw.T if transposed else dw


def assert_same(got, want, rtol: float) -> None:
    """(value, dz, dw) triples equal up to `rtol` of each tensor's largest magnitude."""
    from tests.dml_core.losses.test_info_nce import assert_close_rel

    for name, a, b in zip(("value", "dz", "dw"), got, want):
        assert a.shape == b.shape, name
        assert_close_rel(a, b, rtol)

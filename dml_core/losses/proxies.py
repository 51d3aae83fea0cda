"""Learnable class proxies, the shared part of the proxy-based base losses (METHODS.md 2.1).

`W` (num_classes, embedding_dim) is a parameter of the loss, used L2-normalised: `cos_ij = z_i . w_j`. The
training loop trains it at `train.lr * loss.proxy_lr_mult` (`training.build.build_optimizer`), saves it with
the loss's state in every checkpoint, and under DDP averages its gradient over ranks (`average_loss_grads`),
as DDP does for the model's weights.
"""
from __future__ import annotations

import torch
from torch import nn

from dml_core.checks import check_int, l2_normalize
from dml_core.losses.base import EmbeddingLoss

PROXY_LR_MULT = 100.0  # METHODS.md 2.1 default (the Proxy-Anchor paper's)


class ProxyLoss(EmbeddingLoss):
    """Base of the losses over class proxies: holds `proxies` and computes the cosines to them.

    The proxies are initialised as in the Proxy-Anchor paper (Kaiming normal, fan_out) from a generator
    seeded with `seed`, so every rank of a run starts from the same proxies without a broadcast.
    """

    def __init__(self, num_classes: int, embedding_dim: int, seed: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        num_classes = check_int(num_classes, "num_classes", owner, 2)
        embedding_dim = check_int(embedding_dim, "embedding_dim", owner, 1)
        weights = torch.empty(num_classes, embedding_dim)
        nn.init.kaiming_normal_(weights, mode="fan_out", generator=torch.Generator().manual_seed(int(seed)))
        self.proxies = nn.Parameter(weights)

    @property
    def num_classes(self) -> int:
        return self.proxies.shape[0]

    def cosines(self, z: torch.Tensor) -> torch.Tensor:
        """(n, C) cosines of the normalised embeddings `z` (n, D) to the normalised proxies."""
        if z.shape[1] != self.proxies.shape[1]:
            raise ValueError(f"{type(self).__name__}: embeddings of dim {z.shape[1]}, proxies of dim "
                             f"{self.proxies.shape[1]} (model.embedding_dim must match)")
        return z @ l2_normalize(self.proxies.to(z.dtype)).T

    def check_labels(self, labels: torch.Tensor) -> None:
        """Every label is a proxy's row. Pass the global batch's labels, so that every rank raises alike."""
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"{type(self).__name__}: labels out of range [0, {self.num_classes}): "
                             f"{labels[bad][:5].tolist()} (first 5 shown); there is one proxy per training class")


def proxy_parameters(loss: nn.Module) -> list[nn.Parameter]:
    """The class proxies of every `ProxyLoss` inside `loss` (a term of a sum, or wrapped)."""
    return [m.proxies for m in loss.modules() if isinstance(m, ProxyLoss)]

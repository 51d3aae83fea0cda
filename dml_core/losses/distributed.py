"""Distribution you opt into (pytorch-metric-learning's `DistributedLossWrapper`, with our exact scaling)."""
from __future__ import annotations

import torch
from torch import nn

from dml_core.losses.base import EmbeddingLoss
from dml_core.losses.batch import EmbeddingBatch


class DistributedLoss(nn.Module):
    """`loss` over the global batch of all ranks of `group`: one all-gather per step, then `loss.compute`.

    `forward(z, labels, ids=None)` takes this rank's raw embeddings and returns its share of the global-batch
    loss (METHODS.md 1.2): after DDP averages the model's gradients they equal the single-process gradient
    of the whole global batch. Every rank must call it with the same shapes, every step. Without a process
    group (or with one rank) it is `loss` itself. The loss's own parameters (a learnable logit scale) are
    not in the model's DDP: call `dml_core.distributed.average_loss_grads(loss)` after backward.

    `stats` are the inner loss's; `state_dict()` / `load_state_dict()` use the inner loss's keys, so a
    checkpoint of the wrapped loss and of the bare one are interchangeable.
    """

    def __init__(self, loss: EmbeddingLoss, group=None) -> None:
        super().__init__()
        self.loss, self.group = loss, group
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @property
    def stats(self) -> dict[str, float]:
        return self.loss.stats

    def forward(self, z: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss.compute(EmbeddingBatch.gather(z, labels, ids, self.group))


def _drop_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "loss.")]:
        state_dict[prefix + key[len(prefix) + len("loss."):]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "loss." + key[len(prefix):]] = state_dict.pop(key)

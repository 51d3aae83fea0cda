"""The FCT transformation h (METHODS 6.1): stored old gallery embeddings (and, optionally, a small side-info
embedding stored beside them) -> the new model's space, so a gallery can follow a new model without reading a
single image. With `uncertainty`, h also predicts a per-item log-variance s (FastFill): the items it maps worst
are the ones to re-embed first.

The layout follows FCT's: one branch per input (Linear, i.e. its 1x1 convolution on a 1x1 map, + BatchNorm +
ReLU, twice), concatenated, then a three-layer trunk to the new dimension. Widths are parameters; the paper's
are branch 256 and trunk 2048 for 128-dimensional embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml_core import storage


SPEC_NAME = "transformation"


def _branch(in_dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))


class Transformation(nn.Module):
    """h(e_old, e_side) -> (prediction in the new space, log-variance or None). `side_dim=0`: no side-info."""

    def __init__(self, old_dim: int, new_dim: int, side_dim: int = 0, branch_width: int = 256,
                 trunk_width: int = 2048, uncertainty: bool = False) -> None:
        super().__init__()
        if min(old_dim, new_dim) < 1 or side_dim < 0:
            raise ValueError(f"old_dim and new_dim must be >= 1 and side_dim >= 0, got {old_dim}, {new_dim}, {side_dim}")
        self.old_dim, self.new_dim, self.side_dim, self.uncertainty = old_dim, new_dim, side_dim, uncertainty
        self.spec = {"name": SPEC_NAME, "old_dim": old_dim, "new_dim": new_dim, "side_dim": side_dim,
                     "branch_width": branch_width, "trunk_width": trunk_width, "uncertainty": uncertainty}
        self.old_branch = _branch(old_dim, branch_width)
        self.side_branch = _branch(side_dim, branch_width) if side_dim else None
        joined = branch_width * (2 if side_dim else 1)
        self.trunk = nn.Sequential(nn.Linear(joined, trunk_width), nn.BatchNorm1d(trunk_width), nn.ReLU(inplace=True),
                                   nn.Linear(trunk_width, trunk_width), nn.BatchNorm1d(trunk_width),
                                   nn.ReLU(inplace=True))
        self.out = nn.Linear(trunk_width, new_dim + (1 if uncertainty else 0))

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if old.dim() != 2 or old.shape[1] != self.old_dim:
            raise ValueError(f"old embeddings must be (N, {self.old_dim}), got {tuple(old.shape)}")
        if (side is None) != (self.side_branch is None):
            raise ValueError("side-info given to an h built without it, or missing for an h built with it "
                             f"(side_dim={self.side_dim})")
        feats = self.old_branch(old)
        if side is not None:
            if side.shape != (old.shape[0], self.side_dim):
                raise ValueError(f"side-info must be ({old.shape[0]}, {self.side_dim}), got {tuple(side.shape)}")
            feats = torch.cat([feats, self.side_branch(side)], dim=1)
        out = self.out(self.trunk(feats))
        if self.uncertainty:
            return out[:, :-1], out[:, -1]
        return out, None

    @torch.no_grad()
    def transform(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """The transformed gallery: h's prediction, L2-normalised (eval mode; the training flag is restored)."""
        was_training = self.training
        self.eval()
        try:
            return F.normalize(self(old, side)[0], dim=1)
        finally:
            self.train(was_training)


def load_transformation(checkpoint: str) -> Transformation:
    """The h of a checkpoint directory (or its model file), weights only, in eval mode."""
    from dml_core.models.checkpoint import read_checkpoint
    from dml_core.training.embed import model_url

    url = model_url(checkpoint)
    if not storage.exists(url):
        raise FileNotFoundError(f"no transformation checkpoint at {url}")
    ckpt = read_checkpoint(url)
    spec = dict(ckpt.get("spec") or {})
    if spec.pop("name", None) != SPEC_NAME:
        raise ValueError(f"{url} is not a transformation checkpoint (spec {ckpt.get('spec')})")
    h = Transformation(**spec)
    h.load_state_dict(ckpt["state_dict"])
    return h.eval()

"""The losses of a transformation h (METHODS 6.1), given its prediction and the new model's embeddings:
FCT's point-to-point squared error, and FastFill's uncertainty-weighted form with a point-to-cluster term.

    L_i = || new_i - h_i ||^2
    FastFill: mean_i( 0.5 * exp(-s_i) * (L_i + lambda_c * C_i) + 0.5 * s_i ),
    C_i = cross-entropy of h_i against the new model's class prototypes at temperature tau_c.
Minimising over s_i gives s_i = log(L_i + lambda_c * C_i): s predicts how badly h maps item i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def transformation_loss(pred: torch.Tensor, new: torch.Tensor, log_var: torch.Tensor | None = None, *,
                        prototypes: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        lambda_c: float = 1.0, tau_c: float = 0.05) -> torch.Tensor:
    """Mean point-to-point squared error; with `log_var`, FastFill's loss (with `prototypes` and `labels`,
    its point-to-cluster term too). `new` is the frozen new model's embedding (no gradient flows into it)."""
    if pred.shape != new.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and new embeddings {tuple(new.shape)} differ in shape")
    if tau_c <= 0 or lambda_c < 0:
        raise ValueError(f"tau_c must be > 0 and lambda_c >= 0, got {tau_c} and {lambda_c}")
    point = (pred - new.detach()).pow(2).sum(dim=1)
    if log_var is None:
        return point.mean()
    if (prototypes is None) != (labels is None):
        raise ValueError("the point-to-cluster term needs both prototypes and labels")
    if prototypes is not None:
        logits = F.normalize(pred, dim=1) @ F.normalize(prototypes.detach(), dim=1).T / tau_c
        point = point + lambda_c * F.cross_entropy(logits, labels, reduction="none")
    return (0.5 * torch.exp(-log_var) * point + 0.5 * log_var).mean()

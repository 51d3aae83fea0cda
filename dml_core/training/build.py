"""Build the model, loss, optimizer and LR schedule of a run from its `Config`."""
from __future__ import annotations

import math

import torch

from dml_core.config import PROXY_LOSSES, Config
from dml_core.losses.base import EmbeddingLoss


def build_model_from_config(cfg: Config):
    from dml_core.models.registry import build_model

    m = cfg.model
    return build_model(m.backbone, embedding_dim=m.embedding_dim, in_channels=m.in_channels,
                       image_size=m.image_size, **m.backbone_options)


def num_proxy_classes(cfg: Config, manifest) -> int:
    """C of METHODS.md 2.1, one proxy per class trained on: the training labels (0..T-1), or the first
    `data.train_classes` of them."""
    from dml_core.data.train_reader import first_classes

    return max(first_classes(manifest.split("train"), cfg.data.train_classes)) + 1


def build_loss(cfg: Config, num_samples: int | None = None, old_weights: torch.Tensor | None = None,
               old_embeddings=None, num_classes: int | None = None) -> EmbeddingLoss:
    """Base loss (+ TCM) (+ BCT) (+ PC). `num_samples` sizes the decomposable state; `num_classes` the proxies
    of a proxy-based base (`num_proxy_classes`); `old_weights` are the BCT prototypes (required when
    `loss.bct` is set); `old_embeddings` PC's source of old embeddings by id."""
    lc = cfg.loss
    if lc.base in PROXY_LOSSES:
        loss = _proxy_loss(cfg, num_classes)
    elif lc.base == "info_nce":
        from dml_core.losses.info_nce import InfoNCE

        loss = InfoNCE(tau=lc.tau, tile_size=lc.tile_size, tiled_above=lc.tiled_above)
    elif lc.base == "decomposable":
        from dml_core.losses.decomposable import DecomposableLoss

        if not num_samples:
            raise ValueError("loss.base=decomposable needs num_samples (the id range of the training set)")
        loss = DecomposableLoss(num_samples, tau=lc.tau, gamma=lc.gamma, gamma_shape=lc.gamma_shape,
                                seed=cfg.train.seed, tile_size=lc.tile_size, tiled_above=lc.tiled_above)
    else:
        raise ValueError(f"loss.base is unknown: {lc.base!r}")
    if lc.tcm is not None:
        from dml_core.losses.tcm import TCM

        t = lc.tcm
        loss = loss + TCM(m_pos=t.m_pos, m_neg=t.m_neg, lambda_pos=t.lambda_pos, lambda_neg=t.lambda_neg,
                          tile_size=lc.tile_size, tiled_above=lc.tiled_above)
    if lc.bct is not None:
        from dml_core.losses.bct import BCT

        if old_weights is None:
            raise ValueError("loss.bct is set but no old-model prototypes were given")
        loss = loss + BCT(old_weights, lambda_bct=lc.bct.lambda_bct, tau_bct=lc.bct.tau_bct)
    if lc.pc is not None:
        from dml_core.losses.pc import PositiveCongruent

        if old_weights is None or old_embeddings is None:
            raise ValueError("loss.pc is set but no old-model prototypes and old embeddings were given")
        p = lc.pc
        loss = loss + PositiveCongruent(old_weights, old_embeddings, lambda_pc=p.lambda_pc, alpha=p.alpha,
                                        beta=p.beta, tau_pc=p.tau_pc)
    return loss


def _proxy_loss(cfg: Config, num_classes: int | None) -> EmbeddingLoss:
    """ArcFace, CosFace or Proxy-Anchor (METHODS.md 2.1), its proxies seeded by `train.seed`."""
    from dml_core.losses.arcface import ArcFace, CosFace
    from dml_core.losses.proxy_anchor import ProxyAnchor

    lc = cfg.loss
    if not num_classes:
        raise ValueError(f"loss.base={lc.base} needs num_classes (one proxy per training class)")
    shape = dict(num_classes=num_classes, embedding_dim=cfg.model.embedding_dim, seed=cfg.train.seed)
    if lc.base == "proxy_anchor":
        return ProxyAnchor(**shape, alpha=lc.alpha, delta=lc.delta)
    margin = {} if lc.m is None else {"m": lc.m}  # None: the loss's own default
    return (ArcFace if lc.base == "arcface" else CosFace)(**shape, s=lc.s, **margin)


def build_optimizer(cfg: Config, model: torch.nn.Module, loss: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters and the loss's own (e.g. a learnable logit scale), if any, at `train.lr`;
    class proxies (METHODS.md 2.1) in a second group at `train.lr * loss.proxy_lr_mult`."""
    from dml_core.losses.proxies import proxy_parameters

    own = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    is_proxy = {id(p) for p in proxy_parameters(loss)} if loss is not None else set()
    groups = [{"params": list(model.parameters()) + [p for p in own if id(p) not in is_proxy]}]
    proxies = [p for p in own if id(p) in is_proxy]
    if proxies:
        groups.append({"params": proxies, "lr": cfg.train.lr * cfg.loss.proxy_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at `step`: linear warmup, then constant or cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.steps, t.warmup_steps, t.schedule))

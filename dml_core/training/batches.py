"""The training batches of one rank: the training split read in P x K (supervised) or plain batches, on
the device, with two augmented views per image in self-supervised mode."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from dml_core.data.augment import AugmentConfig, augment, two_views
from dml_core.data.shard_stream import ErrorLog
from dml_core.data.train_reader import TrainReader

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest


def training_batches(cfg: "Config", manifest: "Manifest", rank: int, world_size: int, start: int,
                     device: torch.device, errors: ErrorLog | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, ids) for steps start..steps-1. Self-supervised: both views stacked, each view
    labelled with its sample id (its pair id). Shards and samples skipped (`data.on_error: skip`) go
    into `errors`."""
    supervised = cfg.loss.objective == "supervised"
    reader = TrainReader.from_manifest(
        manifest, "train", rank=rank, world_size=world_size, steps=cfg.train.steps - start,
        num_workers=cfg.data.loader_workers, endpoint_url=cfg.storage.endpoint_url, mode=cfg.loss.objective,
        p=cfg.data.p if supervised else None, k=cfg.data.k if supervised else None,
        batch_size=None if supervised else cfg.data.batch_size, image_size=cfg.model.image_size,
        channels=cfg.model.in_channels, seed=cfg.train.seed, on_error=cfg.data.on_error,
        train_classes=cfg.data.train_classes)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank * 104729 + start)
    aug = AugmentConfig()
    for batch in reader.epoch(start):  # the epoch number reseeds the stream after a resume
        if errors is not None:
            errors.extend(batch.errors)
        images, labels, ids = batch.images.to(device), batch.labels.to(device), batch.ids.to(device)
        if not supervised:
            v1, v2 = two_views(images, aug, gen)
            images, labels, ids = torch.cat([v1, v2]), torch.cat([ids, ids]), torch.cat([ids, ids])
        elif cfg.data.augment:
            images = augment(images, aug, gen)
        yield images, labels, ids

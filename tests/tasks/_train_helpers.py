"""Shared pieces of the training tests: a small fast config and embedding the evaluation classes."""
from __future__ import annotations

import torch

from dml_core.config import config_from_dict
from dml_core.data import storage

SMALL_CNN = {"backbone": "small_cnn", "embedding_dim": 32, "image_size": 28, "in_channels": 1,
             "backbone_options": {"widths": [16, 32, 64]}}


def small_config(root: str, shards: dict, name: str, steps: int, **over) -> "Config":  # noqa: F821
    raw = {
        "run": {"name": name, "root": root},
        "data": {"dataset": shards["name"], "version": shards["version"], "root": shards["root"],
                 "batch_size": 32, "p": 4, "k": 8},
        "model": dict(SMALL_CNN),
        "loss": {"base": "info_nce", "tau": 0.1},
        "train": {"steps": steps, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": max(1, steps // 2),
                  "keep_best": 5, "log_every": 10, "seed": 0},
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 2},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def embed_split(model, shards: dict, split: str, image_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    from dml_core.data.eval_reader import EvalReader
    from dml_core.training.embed import embed_batches

    reader = EvalReader.from_manifest(shards["root"], shards["name"], shards["version"], split, rank=0,
                                      world_size=1, batch_size=256, num_workers=0, image_size=image_size, channels=1)
    z, labels, _ = embed_batches(model, reader)
    return z, labels


def load_checkpoint_model(checkpoint_url: str):
    from dml_core.models.checkpoint import load_model

    return load_model(storage.join(checkpoint_url, "model.pt"))


def eval_recall(model, shards: dict) -> float:
    """Leave-one-out Recall@1 over all evaluation-class items (eval + gallery)."""
    from dml_core.metrics import recall_at_k

    zq, lq = embed_split(model, shards, "eval")
    zg, lg = embed_split(model, shards, "gallery")
    return float(recall_at_k(torch.cat([zq, zg]), torch.cat([lq, lg]), k=1))

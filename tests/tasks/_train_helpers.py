"""Shared pieces of the training tests: a small fast config, a worker-killing step hook, Recall@1."""
from __future__ import annotations

import os
import signal

import torch

from dml_core.config import config_from_dict
from dml_core.training.embed import embed_split

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


class KillOnce:
    """A `run_training(on_step=...)` hook: SIGKILL the worker of `rank` at `step`, once (a marker file
    remembers it, so the restarted worker group runs through)."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"killed pid {os.getpid()} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def eval_recall(model, shards: dict) -> float:
    """Leave-one-out Recall@1 over all evaluation-class items (eval + gallery)."""
    from dml_core.metrics import recall_at_k

    zq, lq, _ = embed_split(model, shards["manifest"], "eval")
    zg, lg, _ = embed_split(model, shards["manifest"], "gallery")
    return float(recall_at_k(torch.cat([zq, zg]), torch.cat([lq, lg]), k=1))


class FailAt:
    """A `run_training(on_step=...)` hook: every rank raises `error` at `step`, and logs each raise to `log`."""

    def __init__(self, step: int, error: type[Exception], log: str) -> None:
        self.step, self.error, self.log = step, error, log

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step:
            with open(self.log, "a") as f:
                f.write(f"rank {rank}\n")
            raise self.error(f"step {step} failed on purpose")

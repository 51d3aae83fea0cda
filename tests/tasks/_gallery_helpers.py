"""Shared pieces of the backfill and serving-update tests."""
from __future__ import annotations

import os

import pytest


def shard_gallery_dataset(root: str):
    """Fashion-MNIST, 24 images per class: a gallery split of 8 shards of 8 images (resumable work to kill)."""
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import fashion_mnist
    from dml_core.data.sources.idx import FASHION_MNIST_DIR

    if not os.path.exists(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}")
    return shard_dataset(fashion_mnist(subsets=("train",), max_per_class=24), root, "fmnist-gallery", seed=0,
                         eval_class_fraction=0.5, gallery_fraction=0.5, max_shard_samples=8)

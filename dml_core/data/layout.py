"""Names in the dataset layout (DESIGN.md, storage layout): where a dataset version lives, what its
shard files are called, and which tar members a sample holds. Every other module takes them from here."""
from __future__ import annotations

import re

from dml_core import storage

SPLITS = ("train", "eval", "gallery")
MANIFEST_FILE = "manifest.json"
SHARD_NAME = re.compile(r"^(train|eval|gallery)-\d{6}\.tar$")

# Extensions of the tar members of one sample (`{id:012d}.{ext}`): exactly one data member, plus labels.
IMAGE_MEMBERS = ("png", "jpg", "jpeg")
DATA_MEMBERS = (*IMAGE_MEMBERS, "npy")
LABEL_MEMBERS = ("cls", "json")
SAMPLE_MEMBERS = (*DATA_MEMBERS, *LABEL_MEMBERS)


def dataset_url(root: str, name: str, version: str) -> str:
    """`<root>/datasets/<name>/<version>`: the folder holding one version's shards and manifest."""
    return storage.join(root, "datasets", name, version)


def shard_name(split: str, index: int) -> str:
    """The file name of a split's `index`-th shard, e.g. `train-000003.tar`."""
    return f"{split}-{index:06d}.tar"

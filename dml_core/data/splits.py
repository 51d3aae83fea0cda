"""Open-world splits: training and evaluation classes are disjoint; evaluation classes are split per
class into queries ("eval") and "gallery". Everything is deterministic from the seed."""
from __future__ import annotations

import numpy as np

from dml_core.data.layout import SPLITS


def split_classes(class_names: list[str], eval_class_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train classes, eval classes), each sorted; round(fraction * C) eval classes, at least one of
    each kind when 0 < fraction < 1 and there are two or more classes."""
    if not 0.0 <= eval_class_fraction <= 1.0:
        raise ValueError(f"eval_class_fraction must be in [0, 1], got {eval_class_fraction}")
    names = sorted(set(class_names))
    n_eval = int(round(eval_class_fraction * len(names)))
    if 0.0 < eval_class_fraction < 1.0 and len(names) >= 2:
        n_eval = min(max(n_eval, 1), len(names) - 1)
    order = np.random.default_rng([seed, 0]).permutation(len(names))
    eval_set = {names[i] for i in order[:n_eval]}
    return [c for c in names if c not in eval_set], [c for c in names if c in eval_set]


def gallery_query_split(ids: list[int], gallery_fraction: float, seed: int, class_index: int) -> tuple[list[int], list[int]]:
    """(gallery ids, query ids) of one evaluation class: round(fraction * n) gallery items, but at
    least one gallery and one query item when n >= 2 (a single item goes to the gallery)."""
    if not 0.0 < gallery_fraction < 1.0:
        raise ValueError(f"gallery_fraction must be in (0, 1), got {gallery_fraction}")
    ids = sorted(ids)
    n_gallery = min(max(int(round(gallery_fraction * len(ids))), 1), max(len(ids) - 1, 1))
    order = np.random.default_rng([seed, 1, class_index]).permutation(len(ids))
    gallery = sorted(ids[i] for i in order[:n_gallery])
    return gallery, sorted(ids[i] for i in order[n_gallery:])


def label_map(train_classes: list[str], eval_classes: list[str]) -> dict[str, int]:
    """Contiguous labels: training classes 0..T-1 (sorted), then evaluation classes T..C-1 (sorted),
    so a classifier/proxy head over the T training classes can use the labels as they are."""
    return {c: i for i, c in enumerate(list(train_classes) + list(eval_classes))}


def assign_splits(class_of: dict[int, str], eval_classes: list[str], gallery_fraction: float, seed: int) -> dict[int, str]:
    """Split name for every sample id, given each id's class and the evaluation classes."""
    eval_set = set(eval_classes)
    split = {i: "train" for i, c in class_of.items() if c not in eval_set}
    by_class: dict[str, list[int]] = {c: [] for c in eval_classes}
    for i, c in class_of.items():
        if c in eval_set:
            by_class[c].append(i)
    for k, c in enumerate(sorted(eval_classes)):
        gallery, queries = gallery_query_split(by_class[c], gallery_fraction, seed, k)
        split.update({i: "gallery" for i in gallery})
        split.update({i: "eval" for i in queries})
    return split


def shard_order(ids: list[int], seed: int, split: str) -> list[int]:
    """The order samples of one split are written in: a seeded permutation, so a shard mixes classes."""
    ids = sorted(ids)
    order = np.random.default_rng([seed, 2, SPLITS.index(split)]).permutation(len(ids))
    return [ids[i] for i in order]

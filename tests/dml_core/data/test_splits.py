import numpy as np
import pytest

from dml_core.data.splits import assign_splits, gallery_query_split, label_map, shard_order, split_classes

CLASSES = [f"class{i:02d}" for i in range(20)]


def test_split_classes_disjoint_complete_and_sized():
    train, ev = split_classes(CLASSES, 0.3, seed=1)
    assert not set(train) & set(ev)
    assert sorted(train + ev) == CLASSES
    assert len(ev) == 6


def test_split_classes_deterministic_and_seed_dependent():
    assert split_classes(CLASSES, 0.5, 3) == split_classes(list(reversed(CLASSES)), 0.5, 3)
    assert len({tuple(split_classes(CLASSES, 0.5, s)[1]) for s in range(5)}) > 1


@pytest.mark.parametrize("fraction, n_eval", [(0.0, 0), (1.0, 20), (0.01, 1), (0.99, 19)])
def test_split_classes_edges(fraction, n_eval):
    assert len(split_classes(CLASSES, fraction, 0)[1]) == n_eval


def test_split_classes_rejects_bad_fraction():
    with pytest.raises(ValueError, match="eval_class_fraction"):
        split_classes(CLASSES, 1.5, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11])
def test_gallery_query_split_partitions(n):
    ids = list(range(100, 100 + n))
    gallery, queries = gallery_query_split(ids, 0.5, seed=0, class_index=0)
    assert sorted(gallery + queries) == ids
    assert len(gallery) >= 1
    if n >= 2:
        assert len(queries) >= 1
        assert len(gallery) == min(max(round(n / 2), 1), n - 1)


def test_assign_splits_open_world():
    rng = np.random.default_rng(0)
    class_of = {i: CLASSES[int(c)] for i, c in enumerate(rng.integers(0, 20, size=500))}
    train, ev = split_classes(list(class_of.values()), 0.5, seed=7)
    split = assign_splits(class_of, ev, 0.5, seed=7)
    assert set(split) == set(class_of)
    train_cls = {class_of[i] for i, s in split.items() if s == "train"}
    eval_cls = {class_of[i] for i, s in split.items() if s != "train"}
    assert train_cls == set(train) and eval_cls == set(ev) and not train_cls & eval_cls
    for c in ev:  # every eval class has queries and gallery items
        assert {split[i] for i in class_of if class_of[i] == c} == {"eval", "gallery"}
    assert split == assign_splits(class_of, ev, 0.5, seed=7)


def test_label_map_contiguous_train_first():
    labels = label_map(["b", "d"], ["a", "c"])
    assert labels == {"b": 0, "d": 1, "a": 2, "c": 3}


def test_shard_order_is_seeded_permutation():
    ids = list(range(50))
    order = shard_order(ids, 0, "train")
    assert sorted(order) == ids and order != ids
    assert order == shard_order(list(reversed(ids)), 0, "train")
    assert order != shard_order(ids, 1, "train")

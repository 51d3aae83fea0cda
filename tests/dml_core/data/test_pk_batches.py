import itertools
import random
from collections import Counter

import pytest

from dml_core.data.pk_batches import PKBatcher


def _stream(num_classes, per_class, seed=0):
    items = [(c, i) for c in range(num_classes) for i in range(per_class)]
    random.Random(seed).shuffle(items)
    return items


def _label(item):
    return item[0]


def test_exactly_p_classes_with_k_each_when_data_suffices():
    items = _stream(20, 12)
    pk = PKBatcher(p=4, k=3, buffer_size=60, seed=1, label_fn=_label)
    batches = list(pk(items))
    assert batches and pk.stats["relaxed_batches"] == 0
    seen = []
    for b in batches:
        counts = Counter(_label(x) for x in b)
        assert len(b) == 12 and len(counts) == 4 and set(counts.values()) == {3}
        seen += b
    assert len(seen) == len(set(seen))  # no item used twice
    assert set(seen) <= set(items)
    assert len(seen) + pk.stats["dropped"] + pk.stats["leftover"] == len(items)


def test_scarce_classes_still_give_positives_and_fixed_size():
    # 200 classes of 3 items each, K=4: no class can ever give K items.
    items = _stream(200, 3, seed=2)
    pk = PKBatcher(p=4, k=4, buffer_size=64, seed=0, label_fn=_label)
    batches = list(pk(items))
    assert len(batches) > 10 and pk.stats["relaxed_batches"] == len(batches)
    for b in batches:
        counts = Counter(_label(x) for x in b)
        assert len(b) == 16 and min(counts.values()) >= 2 and max(counts.values()) <= 4
    used = sum(len(b) for b in batches)
    assert used + pk.stats["dropped"] + pk.stats["leftover"] == len(items)


def test_singletons_are_dropped_and_counted_never_stuck():
    items = [(c, 0) for c in range(500)]  # every class has one item: no batch is possible
    pk = PKBatcher(p=2, k=2, buffer_size=8, label_fn=_label, max_stall=10**6)
    assert list(pk(items)) == []
    assert pk.stats["dropped"] == 500 - 8 and pk.stats["leftover"] == 8


def test_too_few_classes_raise_instead_of_hanging():
    endless = ((i % 3, i) for i in itertools.count())  # 3 classes forever, P = 4
    pk = PKBatcher(p=4, k=2, buffer_size=16, label_fn=_label, max_stall=500)
    with pytest.raises(RuntimeError, match="no 4 x 2 batch could be formed"):
        next(iter(pk(endless)))


def test_deterministic_for_a_seed():
    items = _stream(15, 8)
    a = list(PKBatcher(3, 2, buffer_size=30, seed=4, label_fn=_label)(items))
    b = list(PKBatcher(3, 2, buffer_size=30, seed=4, label_fn=_label)(items))
    c = list(PKBatcher(3, 2, buffer_size=30, seed=5, label_fn=_label)(items))
    assert a == b and a != c


def test_bounded_buffer_on_a_long_stream():
    pk = PKBatcher(p=2, k=2, buffer_size=16, label_fn=_label)
    stream = ((random.Random(i).randrange(1000), i) for i in range(20000))
    n = sum(1 for _ in pk(stream))
    assert n > 0 and pk._size <= 16 and len(pk._by_class) <= 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="k >= 2"):
        PKBatcher(p=4, k=1)
    with pytest.raises(ValueError, match="buffer_size"):
        PKBatcher(p=4, k=4, buffer_size=8)


def test_duplicate_keys_never_share_a_batch():
    items = [x for x in _stream(6, 4) for _ in range(3)]  # each item thrice, as when a shard is resampled
    pk = PKBatcher(p=2, k=2, buffer_size=20, seed=0, label_fn=_label, key_fn=lambda x: x)
    batches = list(pk(items))
    assert batches and pk.stats["duplicates"] > 0
    for b in batches:
        assert len(b) == len(set(b)) == 4


def test_p_above_the_number_of_classes_is_refused_at_construction():
    with pytest.raises(ValueError, match="p=5 classes per batch, but the stream has only 4 classes with at least 2"):
        PKBatcher(p=5, k=2, num_classes=4)
    PKBatcher(p=4, k=2, num_classes=4)  # exactly enough classes is fine


def test_small_split_resampled_forever_with_too_few_classes_raises_instead_of_hanging():
    # The whole split (3 classes x 4 items) fits in the buffer, so every later item is a duplicate and
    # nothing is ever dropped: before the fix this looped forever without yielding.
    split = [(c, i) for c in range(3) for i in range(4)]
    endless = (split[i % len(split)] for i in itertools.count())
    pk = PKBatcher(p=4, k=2, buffer_size=64, label_fn=_label, key_fn=lambda x: x, max_stall=1000)
    with pytest.raises(RuntimeError, match=r"no 4 x 2 batch.*3 distinct classes seen"):
        next(iter(pk(endless)))
    assert pk.stats["duplicates"] > 1000 - len(split)


def test_duplicates_do_not_stop_a_stream_that_makes_batches():
    split = [(c, i) for c in range(6) for i in range(4)]
    stream = (split[random.Random(i).randrange(len(split))] for i in range(5000))
    pk = PKBatcher(p=2, k=2, buffer_size=8, label_fn=_label, key_fn=lambda x: x, max_stall=50)
    assert sum(1 for _ in pk(stream)) > 100 and pk.stats["duplicates"] > 0

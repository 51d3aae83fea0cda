from collections import Counter

import pytest
import torch

from dml_core.config import ConfigError
from dml_core.data.augment import AugmentConfig, two_views
from dml_core.data.manifest import Manifest
from dml_core.data.shard_stream import ShardReadError
from dml_core.data.train_reader import TrainReader, TrainStream, worker_steps
from tests.dml_core.data._shards import image_pixels, truncate, write_dataset

NAME, VERSION = "toy", "0123456789ab"


@pytest.fixture
def dataset(tmp_path):
    root = str(tmp_path)
    samples = write_dataset(root, {"train": (range(0, 6), 8, 5), "eval": (range(6, 8), 2, 1)})
    return Manifest.read(root, NAME, VERSION), samples


def _reader(manifest, rank=0, world_size=1, steps=5, **kw):
    kw = {"mode": "supervised", "p": 3, "k": 2, "shuffle_buffer": 16, "num_workers": 2, "seed": 3, **kw}
    return TrainReader.from_manifest(manifest, rank=rank, world_size=world_size, steps=steps, **kw)


def _check_batch(batch, samples):
    for img, label, sid in zip(batch.images, batch.labels, batch.ids):
        s = samples[int(sid)]
        assert b'"split": "train"' in s["json"] and int(label) == int(s["cls"])
        torch.testing.assert_close(img[0], torch.from_numpy(image_pixels(int(sid))).float() / 255, rtol=0, atol=0)


def test_every_rank_gets_the_same_number_of_pk_batches(dataset):
    manifest, samples = dataset
    per_rank = []
    for rank in range(2):
        reader = _reader(manifest, rank=rank, world_size=2, steps=7)
        batches = list(reader)
        assert len(batches) == len(reader) == 7
        for b in batches:
            counts = Counter(b.labels.tolist())
            assert b.images.shape == (6, 1, 8, 8) and len(counts) == 3 and set(counts.values()) == {2}
            assert len(set(b.ids.tolist())) == 6
            _check_batch(b, samples)
        per_rank.append([b.ids.tolist() for b in batches])
    assert per_rank[0] != per_rank[1]  # ranks read different streams


def test_worker_steps_sum_to_steps():
    for steps in range(1, 12):
        for workers in range(1, 5):
            parts = [worker_steps(steps, w, workers) for w in range(workers)]
            assert sum(parts) == steps and max(parts) - min(parts) <= 1


def test_shards_split_disjointly_between_ranks_and_workers(dataset):
    manifest, _ = dataset
    urls = manifest.shard_urls("train")[:4]
    parts = []
    for rank in range(2):
        stream = TrainStream(urls, rank=rank, world_size=2, steps=1, p=2, k=2)
        parts += [stream.part_urls(w, 2) for w in range(2)]
    assert sorted(u for p in parts for u in p) == sorted(urls) and all(len(p) == 1 for p in parts)
    few = TrainStream(urls[:3], rank=1, world_size=2, steps=1, p=2, k=2)
    assert few.part_urls(0, 2) == urls[:3]  # fewer shards than parts: every part resamples from all


def test_deterministic_per_seed_and_epoch(dataset):
    manifest, _ = dataset
    ids = lambda reader, epoch: [b.ids.tolist() for b in reader.epoch(epoch)]  # noqa: E731
    a, b = _reader(manifest), _reader(manifest)
    assert ids(a, 0) == ids(b, 0)
    assert ids(a, 0) != ids(a, 1)
    assert ids(_reader(manifest, seed=4), 0) != ids(a, 0)


def test_self_supervised_batches_feed_two_views(dataset):
    manifest, samples = dataset
    reader = _reader(manifest, mode="self_supervised", batch_size=10, steps=3, p=None, k=None)
    batches = list(reader)
    assert len(batches) == 3
    for b in batches:
        assert b.images.shape == (10, 1, 8, 8)
        _check_batch(b, samples)
    v1, v2 = two_views(batches[0].images, AugmentConfig(out_size=6), torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (10, 1, 6, 6) and not torch.equal(v1, v2)


def test_corrupt_shard_raises_with_its_name_or_is_skipped_and_counted(dataset):
    manifest, _ = dataset
    urls = manifest.shard_urls("train")
    truncate(urls[1], 0.3)
    with pytest.raises(ShardReadError, match=f"failed reading shard {urls[1]}"):
        list(_reader(manifest, steps=40, num_workers=0))
    reader = _reader(manifest, steps=20, on_error="skip")
    assert len(list(reader)) == 20
    assert reader.errors.shards and all(urls[1] in e for e in reader.errors.shards)


def test_bad_arguments(dataset):
    manifest, _ = dataset
    with pytest.raises(ValueError, match="needs p"):
        _reader(manifest, p=None)
    with pytest.raises(ValueError, match="rank 2 not in"):
        _reader(manifest, rank=2, world_size=2)
    with pytest.raises(ValueError, match="on_error"):
        _reader(manifest, on_error="ignore")
    with pytest.raises(ValueError, match="p=7 classes per batch, but the stream has only 6 classes with at least 2 "
                                         r"items.*split 'train' of .*/datasets/toy/0123456789ab"):
        _reader(manifest, p=7)
    _reader(manifest, p=6)  # exactly enough classes is fine
    with pytest.raises(ValueError, match="no training shards.*split 'gallery'"):
        _reader(manifest, split="gallery")


@pytest.fixture
def scattered(tmp_path):
    """Training labels neither contiguous nor written in order, so "the first N" means sorted labels."""
    root = str(tmp_path)
    samples = write_dataset(root, {"train": ((7, 2, 9, 4, 11, 5), 6, 4), "eval": ((0, 1), 2, 1)})
    return Manifest.read(root, NAME, VERSION), samples


def _first_train_labels(samples, n):
    return set(sorted({int(s["cls"]) for s in samples.values() if b'"split": "train"' in s["json"]})[:n])


@pytest.mark.parametrize("mode", ["supervised", "self_supervised"])
def test_train_classes_keeps_exactly_the_first_n_labels(scattered, mode):
    manifest, samples = scattered
    first = _first_train_labels(samples, 3)
    assert first == {2, 4, 5} and first == set(manifest.split("train").labels[:3])
    kw = {"p": 2, "k": 2} if mode == "supervised" else {"p": None, "k": None, "batch_size": 4}
    reader = _reader(manifest, steps=12, num_workers=0, mode=mode, train_classes=3, **kw)
    seen = Counter()
    for b in reader:
        _check_batch(b, samples)
        seen.update(b.labels.tolist())
    assert set(seen) == first and sum(seen.values()) == 12 * 4


def test_train_classes_beyond_the_split_or_p_beyond_them_is_refused(scattered):
    manifest, _ = scattered
    with pytest.raises(ValueError, match=r"data\.train_classes=7, but the split has 6 classes \(split 'train' of "):
        _reader(manifest, train_classes=7)
    with pytest.raises(ValueError, match="p=3 classes per batch, but the stream has only 2 classes"):
        _reader(manifest, p=3, train_classes=2)
    _reader(manifest, p=6, train_classes=6)  # all of them is fine
    with pytest.raises(ValueError, match="classes is empty"):
        TrainStream(manifest.shard_urls("train"), rank=0, world_size=1, steps=1, p=2, k=2, classes=[])


def test_a_part_whose_shards_hold_none_of_the_classes_is_refused_not_waited_on(tmp_path):
    """Four shards of one label each, four ranks, the first two labels: two ranks read shards of only the other
    labels; they fail naming data.train_classes instead of resampling forever."""
    write_dataset(str(tmp_path), {"train": (range(4), 1, 4)})  # dealt round robin: shard i holds label i
    manifest = Manifest.read(str(tmp_path), NAME, VERSION)
    kw = {"mode": "self_supervised", "p": None, "k": None, "batch_size": 1, "num_workers": 0, "train_classes": 2}
    outcomes = []
    for rank in range(4):
        try:
            outcomes.append({int(x) for b in _reader(manifest, rank=rank, world_size=4, steps=5, **kw)
                             for x in b.labels})
        except ConfigError as e:  # a setting, not a fault: Ray does not retry the run
            assert f"rank {rank}: none of 11 samples read from its 1 shard(s)" in str(e)
            assert "data.train_classes" in str(e)
            outcomes.append("refused")
    assert sorted(map(str, outcomes)) == ["refused", "refused", "{0}", "{1}"]

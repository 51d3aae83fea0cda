"""Every reader checks each shard it finishes against the manifest's sample count: a shard cut at a tar
member boundary (a clean, shorter tar) or with a sample appended raises a ShardReadError naming the shard
and both counts, or with on_error="skip" is skipped and counted. On local disk and on S3 (SeaweedFS)."""
import uuid

import pytest

from dml_core import storage
from dml_core.data.eval_reader import EvalReader
from dml_core.data.manifest import Manifest
from dml_core.data.shard_stream import ShardReadError, iter_samples
from dml_core.data.train_reader import TrainReader
from tests.dml_core.data._shards import append_sample, cut_at_sample, make_sample, write_dataset

NAME, VERSION = "toy", "0123456789ab"
TRAIN_PER_SHARD, EVAL_PER_SHARD = 16, 4  # 6 classes x 8 over 3 shards; 3 classes x 4 over 3 shards
EXTRA_ID = 99999


def _dataset(tmp_path, request, damage) -> tuple[Manifest, str]:
    """The toy dataset with `damage(local_dir)` applied, on the store the test is parametrized with."""
    root = str(tmp_path / "local")
    write_dataset(root, {"train": (range(0, 6), 8, 3), "eval": (range(6, 9), 4, 3)})
    local_dir = f"{root}/datasets/{NAME}/{VERSION}"
    damage(local_dir)
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        root = s3.url(f"counts-{uuid.uuid4().hex[:8]}")
        fs, path = storage.filesystem(f"{root}/datasets/{NAME}/{VERSION}")
        fs.put(f"{local_dir}/", path, recursive=True)
    return Manifest.read(root, NAME, VERSION), root


def _train(m, on_error="raise"):
    reader = TrainReader.from_manifest(m, rank=0, world_size=1, steps=30, p=3, k=2, shuffle_buffer=8,
                                       num_workers=1, seed=1, on_error=on_error)
    return reader, list(reader)


def _eval(m, on_error="raise"):
    reader = EvalReader.from_manifest(m, "eval", rank=0, world_size=1, batch_size=4, num_workers=1,
                                      on_error=on_error)
    return reader, list(reader)


def _cut(split, keep):
    return lambda d: cut_at_sample(f"{d}/{split}-000001.tar", keep)


def _append(split):
    return lambda d: append_sample(f"{d}/{split}-000001.tar", make_sample(EXTRA_ID, 0, split))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store(request):
    """Which store the damaged dataset lies on (the fixture request: `_dataset` reads its param)."""
    return request


READERS = {"train": (_train, TRAIN_PER_SHARD), "eval": (_eval, EVAL_PER_SHARD)}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_shard_cut_at_a_member_boundary_is_named_with_both_counts(tmp_path, store, split):
    read, n = READERS[split]
    m, _ = _dataset(tmp_path, store, _cut(split, 2))
    url = f"{m.url}/{split}-000001.tar"
    with pytest.raises(ShardReadError, match=f"failed reading shard {url}: it holds 2 samples, the manifest "
                                             f"says {n} \\(truncated\\?\\)"):
        read(m)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_shard_with_an_appended_sample_is_named_with_both_counts(tmp_path, store, split):
    read, n = READERS[split]
    m, _ = _dataset(tmp_path, store, _append(split))
    url = f"{m.url}/{split}-000001.tar"
    with pytest.raises(ShardReadError, match=f"failed reading shard {url}: it holds {n + 1} samples, the "
                                             f"manifest says {n} \\(appended to\\?\\)"):
        read(m)


def test_skip_mode_counts_short_and_long_shards_and_never_yields_the_extra_sample(tmp_path, store):
    def damage(d):
        cut_at_sample(f"{d}/eval-000000.tar", 1)
        append_sample(f"{d}/eval-000002.tar", make_sample(EXTRA_ID, 6, "eval"))
    m, _ = _dataset(tmp_path, store, damage)
    reader, batches = _eval(m, on_error="skip")
    ids = [int(i) for b in batches for i in b.ids]
    assert EXTRA_ID not in ids and len(ids) == len(set(ids)) == 1 + 2 * EVAL_PER_SHARD
    assert len(reader.errors.shards) == 2 and not reader.errors.samples
    assert f"{m.url}/eval-000000.tar: it holds 1 samples" in reader.errors.shards[0]
    assert f"{m.url}/eval-000002.tar: it holds 5 samples" in reader.errors.shards[1]


def test_skip_mode_training_runs_through_and_counts_every_skipped_read(tmp_path, store):
    m, _ = _dataset(tmp_path, store, _cut("train", 3))
    reader, batches = _train(m, on_error="skip")
    assert len(batches) == 30
    assert reader.errors.shards and all(f"{m.url}/train-000001.tar: it holds 3 samples, the manifest says 16 "
                                        "(truncated?); the 3 sample(s) read from it before were kept"
                                        in e for e in reader.errors.shards)
    assert reader.errors.kept == 3 * len(reader.errors.shards)  # each read of it trained on its 3 samples


def test_skip_mode_counts_the_samples_read_from_a_short_shard_as_the_reader_yields_them(tmp_path, store):
    """A short shard is found at its end, after its samples were yielded: the count of them kept (in the
    message and `errors.kept`) is the number of its samples in the batches."""
    m, _ = _dataset(tmp_path, store, _cut("eval", 2))
    bad = f"{m.url}/eval-000001.tar"
    in_bad = {int(s["__key__"]) for s in iter_samples([bad])}  # what the cut shard holds
    reader, batches = _eval(m, on_error="skip")
    yielded = sum(int(i) in in_bad for b in batches for i in b.ids)
    assert yielded == reader.errors.kept == len(in_bad) == 2
    assert reader.errors.shards == [f"failed reading shard {bad}: it holds 2 samples, the manifest says "
                                    f"{EVAL_PER_SHARD} (truncated?); the 2 sample(s) read from it before were kept"]

import pytest
import torch

from dml_core.data.eval_reader import EvalReader
from dml_core.data.manifest import Manifest, ManifestError
from dml_core.data.shard_stream import ShardReadError, iter_samples
from tests.dml_core.data._shards import image_pixels, truncate, write_dataset

NAME, VERSION = "toy", "0123456789ab"


@pytest.fixture
def dataset(tmp_path):
    root = str(tmp_path)
    samples = write_dataset(root, {"train": (range(0, 4), 3, 2), "eval": (range(4, 9), 5, 6),
                                   "gallery": (range(4, 9), 2, 1)})
    return Manifest.read(root, NAME, VERSION), samples


def _read(manifest, splits="eval", rank=0, world_size=1, num_workers=2, **kw):
    reader = EvalReader.from_manifest(manifest, splits, rank=rank, world_size=world_size,
                                      batch_size=4, num_workers=num_workers, **kw)
    batches = list(reader)
    return reader, batches


def _ids(batches):
    return [int(i) for b in batches for i in b.ids]


def test_raw_round_trip_identical_bytes(dataset):
    manifest, samples = dataset
    urls = manifest.shard_urls(["eval", "gallery"])
    read = list(iter_samples(urls))
    ids = [int(s["__key__"]) for s in read]
    expected = {i for i, s in samples.items() if s["json"].find(b'"split": "train"') < 0}
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    for s in read:
        orig = samples[int(s["__key__"])]
        assert s["png"] == orig["png"] and s["cls"] == orig["cls"] and s["json"] == orig["json"]


def test_decoded_round_trip_every_sample_once(dataset):
    manifest, samples = dataset
    reader, batches = _read(manifest, ["eval", "gallery"])
    ids = _ids(batches)
    assert len(ids) == len(set(ids)) == 25 + 10
    for b in batches:
        assert b.images.shape[1:] == (1, 8, 8) and b.labels.dtype == b.ids.dtype == torch.int64
        for img, label, sid in zip(b.images, b.labels, b.ids):
            assert int(label) == int(samples[int(sid)]["cls"])
            torch.testing.assert_close(img[0], torch.from_numpy(image_pixels(int(sid))).float() / 255,
                                       rtol=0, atol=0)
    assert reader.errors.shards == [] and reader.errors.samples == []


@pytest.mark.parametrize("split_by, num_shards_note", [("auto", "shard mode: 6 shards >= 4 parts"),
                                                       ("sample", "forced sample mode")])
def test_two_ranks_two_workers_disjoint_and_complete(dataset, split_by, num_shards_note):
    manifest, samples = dataset
    per_rank = []
    for rank in range(2):
        reader, batches = _read(manifest, "eval", rank=rank, world_size=2, split_by=split_by)
        assert reader.stream.mode == ("shard" if split_by == "auto" else "sample")
        ids = _ids(batches)
        assert len(ids) == reader.rank_count()
        per_rank.append(ids)
    eval_ids = {i for i, s in samples.items() if b'"split": "eval"' in s["json"]}
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(eval_ids)


def test_few_shards_fall_back_to_samples_and_forced_shard_mode_leaves_parts_empty(dataset):
    manifest, samples = dataset
    gallery_ids = {i for i, s in samples.items() if b'"split": "gallery"' in s["json"]}  # 1 shard
    for split_by, mode in (("auto", "sample"), ("shard", "shard")):
        parts = []
        for rank in range(2):
            reader, batches = _read(manifest, "gallery", rank=rank, world_size=2, split_by=split_by)
            assert reader.stream.mode == mode
            parts.append(_ids(batches))
            assert len(parts[-1]) == reader.rank_count()
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(gallery_ids)
        if mode == "sample":
            assert parts[0] and parts[1]  # both ranks get work
        else:
            assert parts[1] == []  # the only shard went to rank 0, worker 0; rank 1 ends cleanly


def test_truncated_shard_error_names_it(dataset):
    manifest, _ = dataset
    bad = manifest.shard_urls("eval")[2]
    truncate(bad, 0.5)
    with pytest.raises(ShardReadError, match=f"failed reading shard {bad}"):
        _read(manifest, "eval")
    with pytest.raises(ShardReadError, match=bad):
        list(iter_samples([bad]))


def test_skip_mode_counts_and_keeps_the_rest(dataset):
    manifest, samples = dataset
    urls = manifest.shard_urls("eval")
    truncate(urls[2], 0.5)
    truncate(urls[4], 0.0)
    reader, batches = _read(manifest, "eval", on_error="skip")
    assert len(reader.errors.shards) == 2
    assert any(urls[2] in e for e in reader.errors.shards) and any(urls[4] in e for e in reader.errors.shards)
    ids = _ids(batches)
    intact = {int(s["__key__"]) for u in (urls[0], urls[1], urls[3], urls[5]) for s in iter_samples([u])}
    assert len(ids) == len(set(ids)) and intact <= set(ids) and len(ids) < 25


def test_missing_split_and_manifest(dataset, tmp_path):
    manifest, _ = dataset
    with pytest.raises(KeyError, match=f"'test' not in manifest {manifest.url}/manifest.json"):
        EvalReader.from_manifest(manifest, "test", rank=0, world_size=1)
    with pytest.raises(ManifestError, match="manifest.json not found"):
        Manifest.read(str(tmp_path / "nowhere"), NAME, VERSION)


def _by_id(reader):
    out = {}
    for b in reader:
        for img, label, sid in zip(b.images, b.labels, b.ids):
            assert int(sid) not in out
            out[int(sid)] = (int(label), img)
    return out


def test_reads_the_shard_writers_output(fmnist_shards):
    import io

    import numpy as np
    from PIL import Image

    from dml_core import storage
    from tests.dml_core.data.readback import read_dataset

    m = fmnist_shards["manifest"]
    reader = EvalReader.from_manifest(m, ["eval", "gallery"], rank=0, world_size=1, batch_size=32, num_workers=2)
    got = _by_id(reader)
    truth = [s for s in read_dataset(m, lambda n: storage.read_bytes(storage.join(m.url, n)))
             if s["split"] != "train"]
    assert sorted(got) == sorted(s["meta"]["id"] for s in truth)
    for s in truth:
        label, img = got[s["meta"]["id"]]
        pixels = np.asarray(Image.open(io.BytesIO(s["data"])).convert("L"), dtype=np.float32) / 255
        assert label == s["cls"] and torch.equal(img[0], torch.from_numpy(pixels))


@pytest.mark.slow
def test_s3_reads_match_local(fmnist_shards, fmnist_s3_shards, s3_server):
    from dml_core.data.train_reader import TrainReader

    local, remote = fmnist_shards["manifest"], fmnist_s3_shards["manifest"]
    assert remote.url.startswith("s3://") and (remote.version, remote.splits) == (local.version, local.splits)
    kw = dict(rank=0, world_size=1, batch_size=16, num_workers=2)
    a = _by_id(EvalReader.from_manifest(local, "eval", **kw))
    b = _by_id(EvalReader.from_manifest(remote, "eval", endpoint_url=s3_server.endpoint_url, **kw))
    assert a.keys() == b.keys() and len(a) == local.split("eval").count
    assert all(a[i][0] == b[i][0] and torch.equal(a[i][1], b[i][1]) for i in a)
    train = TrainReader.from_manifest(remote, rank=1, world_size=2, steps=3, p=2, k=4, num_workers=2,
                                      endpoint_url=s3_server.endpoint_url)
    assert [len(x) for x in train] == [8, 8, 8]

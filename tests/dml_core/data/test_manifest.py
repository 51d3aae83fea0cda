import dataclasses
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from dml_core.data.manifest import (Manifest, ManifestError, ManifestMissing, ShardInfo, SplitInfo, UnknownSplit,
                                    list_versions)
from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import SyntheticSource
from tests.dml_core.data.readback import read_dataset


@pytest.fixture
def dataset(tmp_path):
    m = shard_dataset(SyntheticSource(num_classes=6, per_class=6, kind="images", image_size=(12, 12)),
                      str(tmp_path), "syn", max_shard_samples=5)
    return str(tmp_path), m


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _replace_shard(m: Manifest, split: str, data: bytes) -> tuple[Manifest, str]:
    """Put `data` in place of the split's first shard and record its size and sha256 (not its count)."""
    info = m.split(split)
    first = dataclasses.replace(info.shards[0], bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    Path(m.url, first.name).write_bytes(data)
    m = dataclasses.replace(m, splits={**m.splits, split: dataclasses.replace(info, shards=[first, *info.shards[1:]])})
    m.write()
    return m, first.name


def test_manifest_fields_follow_the_contract(dataset):
    root, m = dataset
    assert Manifest.read(root, "syn", m.version) == m == Manifest.read(root, "syn")
    assert m.url == f"{root}/datasets/syn/{m.version}" and m.manifest_url == f"{m.url}/manifest.json"
    assert m.version == m.fingerprint[:12] and m.source["kind"] == "synthetic"
    assert m.num_classes == len(m.class_names) == 6 and m.num_train_classes == 3
    samples = read_dataset(m, lambda name: Path(m.url, name).read_bytes())
    assert m.count == len(samples) == 36
    for split in ("train", "eval", "gallery"):
        assert [u.rsplit("/", 1)[1] for u in m.shard_urls(split)] == [s.name for s in m.split(split).shards]
        assert m.shards(split) == [(f"{m.url}/{s.name}", s.count) for s in m.split(split).shards]
    assert m.shard_urls(["eval", "gallery"]) == m.shard_urls("eval") + m.shard_urls("gallery")


def test_round_trips_through_dict_and_file(dataset):
    root, m = dataset
    d = m.to_dict()
    assert Manifest.from_dict(d, m.url) == m
    assert json.loads(Path(m.manifest_url).read_text()) == d
    assert Manifest.from_dict(json.loads(json.dumps(d)), m.url).to_dict() == d  # JSON keys are strings
    assert set(d["splits"]["train"]) == {"count", "classes", "id_range", "shards"}
    moved = dataclasses.replace(m, url=f"{root}/elsewhere")
    assert moved == m and moved.url != m.url  # the location is not part of the contract


def test_split_helpers_and_training_label_facts(dataset):
    _, m = dataset
    train = m.split("train")
    assert train.labels == [0, 1, 2] and train.classes == {0: 6, 1: 6, 2: 6}
    assert train.classes_with_at_least(6) == 3 and train.classes_with_at_least(7) == 0
    assert train.num_labels == m.num_train_labels == 3 and not train.missing_labels
    assert m.split("eval").missing_labels == [0, 1, 2]  # evaluation labels come after the training ones
    with pytest.raises(UnknownSplit, match=f"split 'test' not in manifest {m.manifest_url}"):
        m.split("test")
    with pytest.raises(KeyError):
        m.shard_urls(["eval", "test"])


def test_label_facts_of_a_split_with_gaps_and_singletons():
    s = SplitInfo(count=6, classes={0: 1, 2: 4, 3: 1}, shards=[ShardInfo("train-000000.tar", 6, 10240, "0" * 64)])
    assert s.labels == [0, 2, 3] and s.classes_with_at_least(2) == 1 and s.classes_with_at_least(1) == 3
    assert s.num_labels == 4 and s.missing_labels == [1]


URL = "/data/datasets/syn/0123456789ab"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("fingerprint"), "field 'fingerprint' missing or not a string"),
    (lambda d: d.update(num_classes="6"), "field 'num_classes' missing or not an integer"),
    (lambda d: d.update(num_classes=99), "num_classes 99 != len(class_names) 6"),
    (lambda d: d["splits"].pop("gallery"), "field 'splits.gallery' missing"),
    (lambda d: d["splits"].update(test=d["splits"]["eval"]), "unknown splits ['test']"),
    (lambda d: d["splits"]["train"].update(count=1), "splits.train counts disagree"),
    (lambda d: d["splits"]["eval"]["shards"][0].update(name="train-000000.tar"),
     "splits.eval.shards[0] has a bad shard name 'train-000000.tar'"),
    (lambda d: d["splits"]["train"]["shards"][1].update(bytes="12"),
     "field 'splits.train.shards[1].bytes' missing or not an integer"),
    (lambda d: d["splits"]["train"]["classes"].update(x=d["splits"]["train"]["classes"].pop("0")),
     "field 'splits.train.classes' has a key 'x'"),
    (lambda d: d["splits"]["train"]["classes"].update({"99": d["splits"]["train"]["classes"].pop("0")}),
     "splits.train.classes has labels outside [0, 6)"),
    (lambda d: d["splits"]["train"].update(id_range=[0]), "field 'splits.train.id_range' is not a pair"),
    (lambda d: d["splits"]["train"].update(id_range=[0, 5]), "splits.train.id_range [0, 5] cannot hold 18"),
    (lambda d: d["skipped"].update(count=3), "field 'skipped.count'"),
    (lambda d: d.update(source=[]), "field 'source' missing or not an object"),
])
def test_validation_names_the_file_and_the_field(dataset, mutate, field):
    d = dataset[1].to_dict()
    mutate(d)
    with pytest.raises(ManifestError, match=re.escape(f"{URL}/manifest.json: ") + ".*" + re.escape(field)):
        Manifest.from_dict(d, URL)


def test_read_names_the_file_of_a_bad_or_misplaced_manifest(dataset):
    root, m = dataset
    d = m.to_dict()
    del d["created"]
    Path(m.manifest_url).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=re.escape(f"{m.manifest_url}: field 'created' missing")):
        Manifest.read(root, "syn", m.version)
    Path(m.manifest_url).write_text("[1, 2]")
    with pytest.raises(ManifestError, match=re.escape(f"{m.manifest_url}: not a JSON object")):
        Manifest.read(root, "syn", m.version)
    Path(m.manifest_url).write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: unreadable"):
        Manifest.read(root, "syn", m.version)
    m.write()
    shutil.copytree(m.url, f"{root}/datasets/syn/copied")
    with pytest.raises(ManifestError, match=f"describes dataset 'syn' version '{m.version}', but lies in the "
                                            "folder of 'syn' version 'copied'"):
        Manifest.read(root, "syn", "copied")
    with pytest.raises(ManifestMissing, match="manifest.json not found"):
        Manifest.read(root, "syn", "nope")


def test_list_versions_oldest_first(tmp_path):
    a = shard_dataset(SyntheticSource(num_classes=2, per_class=2, seed=0), str(tmp_path), "d")
    b = shard_dataset(SyntheticSource(num_classes=2, per_class=2, seed=1), str(tmp_path), "d")
    assert list_versions(str(tmp_path), "d") == [a.version, b.version]
    assert Manifest.read(str(tmp_path), "d").version == b.version
    shutil.rmtree(tmp_path / "datasets" / "d" / b.version)
    assert Manifest.read(str(tmp_path), "d") == a
    with pytest.raises(ManifestMissing, match="no dataset 'zzz'"):
        Manifest.read(str(tmp_path), "zzz")


# ---- verify: one implementation, three levels

def test_verify_names_a_missing_shard_a_wrong_size_and_a_wrong_sha256(dataset):
    _, m = dataset
    assert m.verify() is m and m.verify("sha256") is m and m.verify("full") is m
    shard = Path(m.url, m.split("train").shards[1].name)
    good = shard.read_bytes()
    shard.write_bytes(good[:-600])
    with pytest.raises(ManifestError, match=f"shard {shard} has {len(good) - 600} bytes, manifest says {len(good)}"):
        m.verify("size")
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    m.verify("size")  # same size: only hashing sees it
    with pytest.raises(ManifestError, match=f"shard {shard} sha256 does not match"):
        m.verify("sha256")
    shard.unlink()
    for level in ("size", "sha256", "full"):
        with pytest.raises(ManifestError, match=f"shard {shard} is missing"):
            m.verify(level)
    with pytest.raises(ValueError, match="verify level"):
        m.verify("quick")


def test_verify_full_counts_the_samples_of_every_shard(dataset):
    _, m = dataset
    members = {f"000000000001.{ext}": b"x" for ext in ("png", "cls", "json")}
    m, name = _replace_shard(m, "train", _tar(members))
    m.verify("sha256")  # size and hash as recorded: only parsing sees the wrong count
    with pytest.raises(ManifestError, match=f"shard {m.url}/{name} holds 1 samples, manifest says 5"):
        m.verify("full")


def test_verify_full_parses_tars_even_when_hashes_agree(dataset):
    _, m = dataset
    m, name = _replace_shard(m, "eval", b"\x00garbage" * 700)
    with pytest.raises(ManifestError, match=f"{name} is not a valid tar"):
        m.verify("full")
    m, name = _replace_shard(m, "eval", _tar({"000000000001.png": b"x", "000000000001.json": b"{}"}))
    with pytest.raises(ManifestError, match=f"{name}: sample '000000000001' is incomplete"):
        m.verify("full")


def test_fmnist_shards_fixture(fmnist_shards):
    m = fmnist_shards["manifest"]
    assert isinstance(m, Manifest) and m.url == fmnist_shards["url"] and m.version == fmnist_shards["version"]
    assert Manifest.read(fmnist_shards["root"], fmnist_shards["name"]).verify("full") == m
    assert {s: info.count for s, info in m.splits.items()} == {"train": 200, "eval": 100, "gallery": 100}
    assert {s: len(info.shards) for s, info in m.splits.items()} == {"train": 4, "eval": 2, "gallery": 2}
    assert m.num_ids == 400 and m.num_train_labels == 5 and m.split("train").classes_with_at_least(2) == 5

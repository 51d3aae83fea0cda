import copy
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from dml_core.data.manifest import (ManifestError, dataset_url, list_versions, read_manifest, shard_urls,
                                    validate_manifest, verify_dataset, write_manifest)
from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import SyntheticSource
from tests.dml_core.data.readback import read_dataset


@pytest.fixture
def dataset(tmp_path):
    m = shard_dataset(SyntheticSource(num_classes=6, per_class=6, kind="images", image_size=(12, 12)),
                      str(tmp_path), "syn", max_shard_samples=5)
    return str(tmp_path), m, Path(dataset_url(str(tmp_path), "syn", m["version"]))


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _replace_shard(root, m, split, data: bytes, record=True):
    """Put `data` in place of the split's first shard; if `record`, make the manifest agree with it."""
    shard = m["splits"][split]["shards"][0]
    Path(dataset_url(root, "syn", m["version"]), shard["name"]).write_bytes(data)
    if record:
        m = copy.deepcopy(m)
        m["splits"][split]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        write_manifest(root, "syn", m["version"], m)
    return shard["name"]


def test_manifest_fields_follow_the_contract(dataset):
    root, m, _ = dataset
    assert read_manifest(root, "syn", m["version"]) == m == read_manifest(root, "syn")
    assert m["version"] == m["fingerprint"][:12] and m["source"]["kind"] == "synthetic"
    assert m["num_classes"] == len(m["class_names"]) == 6 and m["num_train_classes"] == 3
    samples = read_dataset(m, lambda name: Path(dataset_url(root, "syn", m["version"]), name).read_bytes())
    assert sum(m["splits"][s]["count"] for s in m["splits"]) == len(samples) == 36
    for split in ("train", "eval", "gallery"):
        assert [u.rsplit("/", 1)[1] for u in shard_urls(root, "syn", m["version"], split)] == \
            [s["name"] for s in m["splits"][split]["shards"]]


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.pop("fingerprint"), "'fingerprint'"),
    (lambda m: m.update(num_classes=99), "num_classes"),
    (lambda m: m["splits"].pop("gallery"), "splits.gallery"),
    (lambda m: m["splits"]["train"].update(count=1), "splits.train counts"),
    (lambda m: m["splits"]["eval"]["shards"][0].update(name="train-000000.tar"), "bad shard name"),
])
def test_validate_manifest_names_the_problem(dataset, mutate, match):
    m = copy.deepcopy(dataset[1])
    mutate(m)
    with pytest.raises(ManifestError, match=match):
        validate_manifest(m)


def test_verify_names_missing_truncated_and_corrupt_shards(dataset):
    root, m, version_dir = dataset
    name = m["splits"]["train"]["shards"][1]["name"]
    good = (version_dir / name).read_bytes()
    (version_dir / name).write_bytes(good[:-600])
    with pytest.raises(ManifestError, match=f"{name} has {len(good) - 600} bytes"):
        verify_dataset(root, "syn", m["version"])
    (version_dir / name).write_bytes(good[:100] + b"X" + good[101:])
    with pytest.raises(ManifestError, match=f"{name} sha256"):
        verify_dataset(root, "syn", m["version"])
    (version_dir / name).unlink()
    with pytest.raises(ManifestError, match=f"{name} is missing"):
        verify_dataset(root, "syn", m["version"])


def test_verify_parses_tars_even_when_hashes_agree(dataset):
    root, m, _ = dataset
    name = _replace_shard(root, m, "eval", b"\x00garbage" * 700)
    with pytest.raises(ManifestError, match=f"{name} is not a valid tar"):
        verify_dataset(root, "syn", m["version"])
    name = _replace_shard(root, m, "eval", _tar({"000000000001.png": b"x", "000000000001.json": b"{}"}))
    with pytest.raises(ManifestError, match=f"{name}: sample '000000000001' is incomplete"):
        verify_dataset(root, "syn", m["version"])


def test_list_versions_oldest_first(tmp_path):
    a = shard_dataset(SyntheticSource(num_classes=2, per_class=2, seed=0), str(tmp_path), "d")
    b = shard_dataset(SyntheticSource(num_classes=2, per_class=2, seed=1), str(tmp_path), "d")
    assert list_versions(str(tmp_path), "d") == [a["version"], b["version"]]
    assert read_manifest(str(tmp_path), "d")["version"] == b["version"]
    shutil.rmtree(tmp_path / "datasets" / "d" / b["version"])
    assert read_manifest(str(tmp_path), "d") == a
    with pytest.raises(ManifestError, match="no dataset 'zzz'"):
        read_manifest(str(tmp_path), "zzz")


def test_unreadable_manifest_is_named(dataset):
    root, m, version_dir = dataset
    (version_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: unreadable"):
        read_manifest(root, "syn", m["version"])


def test_fmnist_shards_fixture(fmnist_shards):
    m = fmnist_shards["manifest"]
    assert verify_dataset(fmnist_shards["root"], fmnist_shards["name"], fmnist_shards["version"]) == m
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {"train": 200, "eval": 100, "gallery": 100}
    assert {s: len(m["splits"][s]["shards"]) for s in m["splits"]} == {"train": 4, "eval": 2, "gallery": 2}
    assert json.loads(Path(fmnist_shards["url"], "manifest.json").read_text()) == m

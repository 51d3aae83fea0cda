"""The sample id range in the manifest: recorded by the sharding, and derived for older manifests."""
import json
from pathlib import Path

import pytest

from dml_core.data.manifest import Manifest, ManifestError
from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import ImageFolderSource, SyntheticSource
from tests.dml_core.data._shards import write_dataset
from tests.dml_core.data.readback import read_tar_samples
from tests.dml_core.data.test_sharding import make_image_folder


def _ids_in_shards(m: Manifest, split: str) -> list[int]:
    """Sample ids from the tar member names, read with tarfile (independent of the manifest's code)."""
    return [int(key) for s in m.split(split).shards for key in read_tar_samples(Path(m.url, s.name).read_bytes())]


def _drop_id_ranges(m: Manifest) -> Manifest:
    """Rewrite the manifest in the form written before id ranges were recorded; return it read back."""
    d = m.to_dict()
    for info in d["splits"].values():
        del info["id_range"]
    Path(m.manifest_url).write_text(json.dumps(d))
    root = m.url.rsplit("/datasets/", 1)[0]
    return Manifest.read(root, m.name, m.version)


def test_sharding_records_the_id_range_of_every_split(tmp_path):
    m = shard_dataset(SyntheticSource(num_classes=5, per_class=7, kind="images", image_size=(8, 8)),
                      str(tmp_path), "syn", max_shard_samples=6, eval_class_fraction=0.4)
    for split, info in m.splits.items():
        ids = _ids_in_shards(m, split)
        assert len(ids) == info.count and info.id_range == (min(ids), max(ids) + 1)
    assert m.num_ids == 1 + max(i for s in m.splits for i in _ids_in_shards(m, s)) == 35
    empty = shard_dataset(SyntheticSource(num_classes=2, per_class=3), str(tmp_path), "e", eval_class_fraction=0)
    assert empty.split("eval").id_range == empty.split("gallery").id_range == (0, 0) and empty.num_ids == 6


def test_items_skipped_while_loading_leave_gaps_the_id_range_covers(tmp_path):
    make_image_folder(tmp_path / "src", n_classes=4, per_class=3)
    (tmp_path / "src" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    m = shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path), "gap", on_error="skip")
    ids = [i for s in m.splits for i in _ids_in_shards(m, s)]
    assert len(m.skipped) == 1 and m.count == len(ids) == 12
    assert m.num_ids == 1 + max(ids) == 13 > m.count  # the broken item had an id: counting would be short
    assert _drop_id_ranges(m).num_ids == 13  # older manifest with skipped items: scanned, not counted


def test_older_sharding_manifest_counts_without_reading_a_shard(tmp_path):
    m = shard_dataset(SyntheticSource(num_classes=4, per_class=5), str(tmp_path), "old", eval_class_fraction=0.5)
    old = _drop_id_ranges(m)
    assert old.params is not None and not old.skipped and all(s.id_range is None for s in old.splits.values())
    for s in old.splits.values():
        for shard in s.shards:
            Path(old.url, shard.name).unlink()
    assert old.num_ids == m.num_ids == 20  # ids 0..N-1: no scan (the shards are gone)


def test_manifest_without_params_scans_the_member_names(tmp_path):
    samples = write_dataset(str(tmp_path), {"train": (range(3), 4, 2), "eval": (range(3, 5), 2, 1),
                                            "gallery": (range(3, 5), 1, 1)})
    m = Manifest.read(str(tmp_path), "toy")
    assert m.params is None and all(s.id_range is None for s in m.splits.values())
    assert m.num_ids == 1 + max(samples) == 1018  # write_dataset numbers samples from 1000
    Path(m.url, m.split("gallery").shards[0].name).write_bytes(b"not a tar" * 100)
    with pytest.raises(ManifestError, match="gallery-000000.tar: cannot scan its sample ids"):
        Manifest.read(str(tmp_path), "toy").num_ids


def test_a_legacy_max_id_is_read_as_the_end_of_the_range(tmp_path):
    write_dataset(str(tmp_path), {"train": (range(2), 2, 1)})
    m = Manifest.read(str(tmp_path), "toy")
    d = m.to_dict()
    for name, info in d["splits"].items():
        info["max_id"] = 1003 if name == "train" else -1
    m = Manifest.from_dict(d, m.url)
    assert m.split("train").id_range == (0, 1004) and m.split("eval").id_range == (0, 0) and m.num_ids == 1004

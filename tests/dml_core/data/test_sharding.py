import collections
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dml_core.data.manifest import Manifest, ManifestError
from dml_core.data.sharding import ShardingError, shard_dataset
from dml_core.data.sources import ImageFolderSource, ManifestSource, SourceError, SyntheticSource, fashion_mnist
from dml_core.data.sources.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from tests.dml_core.data.readback import read_dataset

REPO = Path(__file__).resolve().parents[3]


def _image_bytes(rng, fmt: str) -> bytes:
    mode = "L" if fmt == "PNG" and rng.random() < 0.5 else "RGB"
    shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40))) + ((3,) if mode == "RGB" else ())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path, n_classes=6, per_class=5, seed=0) -> dict[str, tuple[str, bytes]]:
    """Class folders of PNG, JPEG and BMP files; returns {relative path: (class, bytes)}."""
    rng = np.random.default_rng(seed)
    files = {}
    for c in range(n_classes):
        for i in range(per_class):
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp")][i % 3]
            rel = f"class_{c}/img_{i}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            data = _image_bytes(rng, fmt)
            (root / rel).write_bytes(data)
            files[rel] = (f"class_{c}", data)
    return files


def local_reader(m):
    return lambda shard: Path(m.url, shard).read_bytes()


def check_round_trip(m, samples, files):
    """Every source file exactly once, identical bytes (pixels for re-encoded BMP), consistent labels."""
    assert sorted(s["meta"]["source"] for s in samples) == sorted(files)
    assert len({s["meta"]["id"] for s in samples}) == len(samples)
    for s in samples:
        class_name, data = files[s["meta"]["source"]]
        assert s["key"] == f"{s['meta']['id']:012d}" and s["meta"]["split"] == s["split"]
        assert s["cls"] == s["meta"]["label"] and m.class_names[s["cls"]] == class_name == s["meta"]["class_name"]
        if s["meta"]["source"].endswith(".bmp"):
            assert s["ext"] == "png"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["data"]))), np.asarray(Image.open(io.BytesIO(data))))
        else:
            assert s["ext"] == {"png": "png", "jpg": "jpg"}[s["meta"]["source"].rsplit(".", 1)[1]]
            assert s["data"] == data
    by_split = collections.defaultdict(collections.Counter)
    for s in samples:
        by_split[s["split"]][s["cls"]] += 1
    for split, info in m.splits.items():
        assert dict(by_split[split]) == info.classes and info.count == sum(by_split[split].values())
    train = {s["cls"] for s in samples if s["split"] == "train"}
    evals = {s["cls"] for s in samples if s["split"] != "train"}
    assert not train & evals and train == set(range(m.num_train_classes))
    assert train | evals == set(range(m.num_classes))


def test_round_trip_image_folder_local(tmp_path):
    files = make_image_folder(tmp_path / "src")
    m = shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path / "out"), "toy", seed=1,
                      max_shard_samples=4)
    samples = read_dataset(m, local_reader(m))
    check_round_trip(m, samples, files)
    assert all(s.count <= 4 for sp in m.splits.values() for s in sp.shards)
    assert m.skipped == []
    assert Manifest.read(str(tmp_path / "out"), "toy", m.version).verify("full") == m


def test_round_trip_fashion_mnist_pixels(tmp_path):
    if not os.path.exists(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz"):
        pytest.skip("apt-get install dataset-fashion-mnist")
    import gzip

    m = shard_dataset(fashion_mnist(subsets=("t10k",), max_per_class=8), str(tmp_path), "fm", seed=0,
                      eval_class_fraction=0.5)
    raw = gzip.open(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    samples = read_dataset(m, local_reader(m))
    assert len(samples) == 80 and {s["ext"] for s in samples} == {"png"}
    assert sorted(info.count for info in m.splits.values()) == [20, 20, 40]
    for s in samples:
        index = int(s["meta"]["source"].split("#")[1])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["data"]))), images[index])
        assert m.class_names[s["cls"]] == FASHION_MNIST_CLASSES[labels[index]]


def test_synthetic_embeddings_round_trip_as_npy(tmp_path):
    src = SyntheticSource(num_classes=4, per_class=5, dim=8, seed=2)
    m = shard_dataset(src, str(tmp_path), "emb", eval_class_fraction=0.5)
    samples = read_dataset(m, local_reader(m))
    expected = {i.ref: src.load(i) for i in src.list_items()}
    assert len(samples) == 20
    for s in samples:
        arr = np.load(io.BytesIO(s["data"]), allow_pickle=False)
        assert s["ext"] == "npy" and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, expected[s["meta"]["source"]])


def test_shards_respect_byte_bound(tmp_path):
    src = SyntheticSource(num_classes=3, per_class=20, kind="images", image_size=(32, 32), noise=0.5)
    limit = 40_000
    m = shard_dataset(src, str(tmp_path), "b", max_shard_bytes=limit, eval_class_fraction=0.0)
    shards = m.split("train").shards
    assert len(shards) > 1 and all(s.bytes <= limit for s in shards)
    assert [Path(m.url, s.name).stat().st_size for s in shards] == [s.bytes for s in shards]
    assert [s.name for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]


def test_font_glyph_subset_shards_and_progress(tmp_path):
    from dml_core.data.sources import FontGlyphSource

    calls = collections.defaultdict(list)
    m = shard_dataset(FontGlyphSource(image_size=16, max_classes=12), str(tmp_path), "glyphs", eval_class_fraction=0.5,
                      progress=lambda split, done, total: calls[split].append((done, total)))
    samples = read_dataset(m, local_reader(m))
    per_class = collections.Counter(s["meta"]["class_name"] for s in samples)
    assert len(per_class) == 12 and min(per_class.values()) >= 20
    for c in m.class_names[m.num_train_classes:]:  # every eval class has queries and a gallery
        assert {s["split"] for s in samples if s["meta"]["class_name"] == c} == {"eval", "gallery"}
    for split, seq in calls.items():
        total = m.split(split).count
        assert [d for d, _ in seq] == list(range(1, total + 1)) and {t for _, t in seq} == {total}


def _snapshot(path: Path) -> dict:
    """Every file and folder under `path` with its mtime, inode and size."""
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size)
            for p in [path, *path.rglob("*")]}


def test_second_run_writes_nothing_and_changed_source_is_new_version(tmp_path):
    make_image_folder(tmp_path / "src", n_classes=4, per_class=3)
    out = tmp_path / "out"
    m1 = shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(out), "toy")
    version_dir = Path(m1.url)
    before, before_dir = _snapshot(out), _snapshot(version_dir)
    time.sleep(0.01)
    for verify in ("size", "sha256"):
        assert shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(out), "toy", verify=verify) == m1
    assert _snapshot(out) == before
    (tmp_path / "src" / "class_0" / "img_0.png").write_bytes(_image_bytes(np.random.default_rng(9), "PNG"))
    m2 = shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(out), "toy")
    assert m2.version != m1.version and _snapshot(version_dir) == before_dir
    assert m2.fingerprint != m1.fingerprint
    # other parameters (another seed) are another version too
    assert shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(out), "toy", seed=5).version not in (
        m1.version, m2.version)


def test_damaged_shard_is_detected_and_rewritten(tmp_path):
    make_image_folder(tmp_path / "src", n_classes=4, per_class=3)
    m = shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path), "toy")
    shard = Path(m.url, m.split("train").shards[0].name)
    good = shard.read_bytes()
    shard.write_bytes(good[:1000])  # truncated
    with pytest.raises(ManifestError, match=shard.name):
        m.verify()
    shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path), "toy")
    assert shard.read_bytes() == good  # deterministic tars: rewritten byte for byte
    flipped = bytearray(good)
    flipped[700] ^= 0xFF  # same size, different content: only sha256 verification sees it
    shard.write_bytes(bytes(flipped))
    shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path), "toy", verify="size")
    assert shard.read_bytes() == bytes(flipped)
    shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path), "toy", verify="sha256")
    assert shard.read_bytes() == good


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import SyntheticSource
    fast_load = SyntheticSource.load
    def slow_load(self, item):  # about 15 s in all, so the test kills it half-way even on a slow machine
        time.sleep(0.01)
        return fast_load(self, item)
    SyntheticSource.load = slow_load

    def pause_at_sample_50(split, done, total):  # with a handshake dir: 3 train shards written, wait for "go"
        if len(sys.argv) > 2 and split == "train" and done == 50:
            open(os.path.join(sys.argv[2], "ready"), "w").close()
            while not os.path.exists(os.path.join(sys.argv[2], "go")):
                time.sleep(0.01)

    src = SyntheticSource(num_classes=10, per_class=150, kind="images", image_size=(48, 48), noise=0.3, seed=1)
    shard_dataset(src, sys.argv[1], "big", max_shard_samples=15, eval_class_fraction=0.3, progress=pause_at_sample_50)
""")


@pytest.mark.slow
def test_killed_run_then_rerun_gives_complete_dataset(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], cwd=REPO)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            shards = list(out.glob("datasets/big/*/train-*.tar"))
            if len(shards) >= 3:
                break
            assert proc.poll() is None, "sharding subprocess ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no shards appeared within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (version_dir,) = list((out / "datasets" / "big").iterdir())
    assert not (version_dir / "manifest.json").exists()
    committed_at_kill = {p.name for p in version_dir.glob("*.tar")}
    # what a killed writer can leave: a temporary file, and (non-atomic copy tools) a stray partial shard
    (version_dir / "eval-000000.tar.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"partial")
    (version_dir / "gallery-000099.tar").write_bytes(b"junk")
    src = SyntheticSource(num_classes=10, per_class=150, kind="images", image_size=(48, 48), noise=0.3, seed=1)
    m = shard_dataset(src, str(out), "big", max_shard_samples=15, eval_class_fraction=0.3)
    assert m.version == version_dir.name
    m.verify("full")
    listed = {s.name for sp in m.splits.values() for s in sp.shards} | {"manifest.json"}
    assert {p.name for p in version_dir.iterdir()} == listed  # leftovers cleaned
    assert len(committed_at_kill - {"gallery-000099.tar"}) < len(listed) - 1  # it really was killed half-way
    samples = read_dataset(m, local_reader(m))
    assert sorted(s["meta"]["source"] for s in samples) == sorted(i.ref for i in src.list_items())
    expected = {i.ref: src.load(i) for i in src.list_items()[:50]}
    for s in samples:
        if s["meta"]["source"] in expected:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["data"]))), expected[s["meta"]["source"]])


# ---- bad input

def _corrupt_folder(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "src", n_classes=4, per_class=3)
    (tmp_path / "src" / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (tmp_path / "src" / "class_2" / "img_0.png").read_bytes()
    (tmp_path / "src" / "class_2" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "src" / "class_3" / "README.txt").write_text("stray")
    (tmp_path / "src" / "class_empty").mkdir()
    return tmp_path / "src"


def test_bad_images_raise_naming_the_file(tmp_path):
    src = _corrupt_folder(tmp_path)
    with pytest.raises(ShardingError, match=r"class_1/broken\.png|class_2/truncated\.png|class_3/README\.txt|class_empty"):
        shard_dataset(ImageFolderSource(str(src)), str(tmp_path / "out"), "bad")
    (version_dir,) = list((tmp_path / "out" / "datasets" / "bad").glob("*")) or [None]
    assert version_dir is None or not (version_dir / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_unreadable_image_raises_naming_the_file(tmp_path):
    make_image_folder(tmp_path / "src", n_classes=2, per_class=3)
    (tmp_path / "src" / "class_1" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(ShardingError, match=r"class_1/zz_broken\.jpg: unreadable image"):
        shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path / "out"), "bad", eval_class_fraction=0)
    assert not list((tmp_path / "out").rglob("*.tar")) or not list((tmp_path / "out").rglob("manifest.json"))
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_skip_mode_counts_and_records_every_bad_item(tmp_path):
    src = _corrupt_folder(tmp_path)
    m = shard_dataset(ImageFolderSource(str(src)), str(tmp_path / "out"), "bad", on_error="skip")
    reasons = {s.source: s.reason for s in m.skipped}
    assert len(m.skipped) == 4
    assert set(reasons) == {"class_1/broken.png", "class_2/truncated.png", "class_3/README.txt", "class_empty/"}
    assert "unreadable image" in reasons["class_1/broken.png"] and "unreadable image" in reasons["class_2/truncated.png"]
    assert "not an image" in reasons["class_3/README.txt"] and "empty class folder" in reasons["class_empty/"]
    samples = read_dataset(m, local_reader(m))
    assert len(samples) == 12 and not {s["meta"]["source"] for s in samples} & set(reasons)


def test_manifest_source_unknown_label_and_missing_file(tmp_path):
    files = make_image_folder(tmp_path, n_classes=3, per_class=3)
    rows = [f"{rel},{cls}" for rel, (cls, _) in sorted(files.items())]
    rows += ["class_0/img_0.png_missing,class_0", "class_1/img_1.jpg,mystery"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows[:-1] + ["class_2/dup.png,mystery"]) + "\n")
    (tmp_path / "class_2" / "dup.png").write_bytes(files["class_2/img_0.png"][1])
    classes = ["class_0", "class_1", "class_2"]
    with pytest.raises(ShardingError, match=r"class_0/img_0\.png_missing|unknown label 'mystery'"):
        shard_dataset(ManifestSource(str(tmp_path / "m.csv"), classes=classes), str(tmp_path / "out"), "m")
    m = shard_dataset(ManifestSource(str(tmp_path / "m.csv"), classes=classes), str(tmp_path / "out"), "m",
                      on_error="skip")
    reasons = {s.source: s.reason for s in m.skipped}
    assert set(reasons) == {"class_0/img_0.png_missing", "class_2/dup.png"}
    assert "cannot read" in reasons["class_0/img_0.png_missing"] and "unknown label" in reasons["class_2/dup.png"]
    assert m.count == 9


def test_manifest_source_splits_are_used_and_must_be_open_world(tmp_path):
    files = make_image_folder(tmp_path, n_classes=3, per_class=2)
    split_of = {"class_0": "train", "class_1": "query", "class_2": "gallery"}
    rows = [f"{rel},{cls},{split_of[cls]}" for rel, (cls, _) in sorted(files.items())]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    m = shard_dataset(ManifestSource(str(tmp_path / "m.csv")), str(tmp_path / "out"), "m")
    samples = read_dataset(m, local_reader(m))
    assert {(s["meta"]["class_name"], s["split"]) for s in samples} == {
        ("class_0", "train"), ("class_1", "eval"), ("class_2", "gallery")}
    rows[0] = rows[0].replace(",train", ",gallery")
    (tmp_path / "m2.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ShardingError, match="open-world"):
        shard_dataset(ManifestSource(str(tmp_path / "m2.csv")), str(tmp_path / "out"), "m2")


def test_empty_folder_raises(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        shard_dataset(ImageFolderSource(str(tmp_path / "src")), str(tmp_path / "out"), "e")


import collections
import gzip
import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from dml_core.data.sources import (ImageFolderSource, ItemError, ManifestSource, SourceError,
                                   SyntheticSource, fashion_mnist, parse_idx, read_idx)
from dml_core.data.sources.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not os.path.exists(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz"),
                                  reason="apt-get install dataset-fashion-mnist")


def _png(value: int, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


# ---- IDX / Fashion-MNIST

def _independent_idx(path: str, header: int, magic: int, shape_tail: tuple) -> np.ndarray:
    raw = gzip.open(path).read()
    assert int.from_bytes(raw[:4], "big") == magic
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(-1, *shape_tail)


@needs_fmnist
@pytest.mark.parametrize("subset, n", [("train", 60000), ("t10k", 10000)])
def test_fashion_mnist_idx_matches_independent_parse(subset, n):
    images = read_idx(f"{FASHION_MNIST_DIR}/{subset}-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST_DIR}/{subset}-labels-idx1-ubyte.gz")
    ref_images = _independent_idx(f"{FASHION_MNIST_DIR}/{subset}-images-idx3-ubyte.gz", 16, 0x803, (28, 28))
    ref_labels = _independent_idx(f"{FASHION_MNIST_DIR}/{subset}-labels-idx1-ubyte.gz", 8, 0x801, ())
    assert images.shape == (n, 28, 28) and labels.shape == (n,)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert np.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced


@needs_fmnist
def test_fashion_mnist_source_items_and_load():
    src = fashion_mnist(subsets=("t10k",), max_per_class=3)
    items = src.list_items()
    assert len(items) == 30 and collections.Counter(i.class_name for i in items) == {c: 3 for c in FASHION_MNIST_CLASSES}
    ref_images = _independent_idx(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz", 16, 0x803, (28, 28))
    ref_labels = _independent_idx(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz", 8, 0x801, ())
    for item in items:
        index = int(item.ref.split("#")[1])
        np.testing.assert_array_equal(src.load(item), ref_images[index])
        assert item.class_name == FASHION_MNIST_CLASSES[ref_labels[index]]
    # the first 3 of each class in file order
    for c in range(10):
        firsts = np.flatnonzero(ref_labels == c)[:3].tolist()
        assert sorted(int(i.ref.split("#")[1]) for i in items if i.class_name == FASHION_MNIST_CLASSES[c]) == firsts


@pytest.mark.parametrize("dtype_code, dtype", [(0x08, ">u1"), (0x0B, ">i2"), (0x0D, ">f4"), (0x0E, ">f8")])
def test_parse_idx_dtypes_big_endian(dtype_code, dtype):
    a = np.arange(24).reshape(2, 3, 4).astype(dtype)
    raw = bytes([0, 0, dtype_code, 3]) + struct.pack(">3I", 2, 3, 4) + a.tobytes()
    np.testing.assert_array_equal(parse_idx(raw), a.astype(a.dtype.newbyteorder("=")))


@pytest.mark.parametrize("raw, match", [(b"\x01\x00\x08\x01", "bad magic"), (b"\x00\x00\x07\x01" + b"\0" * 4, "data type"),
                                        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "needs 5")])
def test_parse_idx_rejects_bad_files(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_idx(raw, "x.idx")


def test_idx_source_missing_file_names_it(tmp_path):
    from dml_core.data.sources import IdxSource

    with pytest.raises(SourceError, match="nope-images"):
        IdxSource({"train": (str(tmp_path / "nope-images"), str(tmp_path / "nope-labels"))}).list_items()


# ---- image folder and manifest files

def test_image_folder_lists_classes_and_flags_non_images(tmp_path):
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(_png(1))
    (tmp_path / "cat" / "sub" / "b.PNG").write_bytes(_png(2))
    (tmp_path / "dog" / "c.png").write_bytes(_png(3))
    (tmp_path / "dog" / "notes.txt").write_text("hi")
    items = {i.ref: i for i in ImageFolderSource(str(tmp_path)).list_items()}
    assert set(items) == {"cat/a.png", "cat/sub/b.PNG", "dog/c.png", "dog/notes.txt"}
    assert items["cat/sub/b.PNG"].class_name == "cat" and items["cat/sub/b.PNG"].error is None
    assert "not an image" in items["dog/notes.txt"].error
    src = ImageFolderSource(str(tmp_path))
    assert src.load(items["dog/c.png"]) == (tmp_path / "dog" / "c.png").read_bytes()


def test_image_folder_fingerprint_tracks_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png(1))
    fp1 = ImageFolderSource(str(tmp_path)).fingerprint()
    assert ImageFolderSource(str(tmp_path)).fingerprint() == fp1
    (tmp_path / "a" / "x.png").write_bytes(_png(2))
    assert ImageFolderSource(str(tmp_path)).fingerprint() != fp1


def test_empty_image_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "only_empty_class").mkdir()
    with pytest.raises(SourceError, match=str(tmp_path)):
        ImageFolderSource(str(tmp_path)).list_items()
    with pytest.raises(SourceError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "missing")).list_items()


def test_manifest_csv_and_jsonl_resolve_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(_png(10))
    (tmp_path / "abs.png").write_bytes(_png(20))
    (tmp_path / "m.csv").write_text(f"path,label\nimgs/1.png,shoe\n{tmp_path / 'abs.png'},bag\n")
    (tmp_path / "m.jsonl").write_text('{"path": "imgs/1.png", "label": "shoe"}\n\n{"path": "abs.png", "label": 7}\n')
    for name in ("m.csv", "m.jsonl"):
        src = ManifestSource(str(tmp_path / name))
        items = src.list_items()
        assert [i.class_name for i in items] == ["shoe", "bag" if name == "m.csv" else "7"]
        assert src.load(items[0]) == _png(10) and src.load(items[1]) == _png(20)


def test_manifest_unknown_label_split_and_missing_fields(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\na.png,shoe,train\nb.png,hat,query\nc.png,shoe,test\n")
    items = ManifestSource(str(tmp_path / "m.csv"), classes=["shoe"]).list_items()
    assert items[0].error is None and items[0].split == "train"
    assert "row 2: unknown label 'hat'" in items[1].error
    assert "unknown split 'test'" in items[2].error
    (tmp_path / "bad.csv").write_text("path,cls\na.png,x\n")
    with pytest.raises(SourceError, match=r"row 1: missing field\(s\) \['label'\]"):
        ManifestSource(str(tmp_path / "bad.csv")).list_items()
    (tmp_path / "mixed.csv").write_text("path,label,split\na.png,x,train\nb.png,y,\n")
    with pytest.raises(SourceError, match="row 2 has no split"):
        ManifestSource(str(tmp_path / "mixed.csv")).list_items()


def test_manifest_missing_image_is_an_item_error_naming_it(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\ngone.png,x\n")
    src = ManifestSource(str(tmp_path / "m.csv"))
    with pytest.raises(ItemError, match="gone.png"):
        src.load(src.list_items()[0])


# ---- synthetic

def test_synthetic_embeddings_deterministic_and_clustered():
    src = SyntheticSource(num_classes=8, per_class=10, dim=16, noise=0.05, seed=3)
    items = src.list_items()
    x = np.stack([src.load(i) for i in items])
    y = np.array([int(i.class_name[1:]) for i in items])
    assert x.dtype == np.float32 and x.shape == (80, 16)
    np.testing.assert_array_equal(x, np.stack([SyntheticSource(8, 10, dim=16, noise=0.05, seed=3).load(i) for i in items]))
    assert not np.allclose(x, np.stack([SyntheticSource(8, 10, dim=16, noise=0.05, seed=4).load(i) for i in items]))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).all()  # nearest neighbour is always same-class


def test_iterating_a_source_yields_ref_data_class(tmp_path):
    src = SyntheticSource(num_classes=3, per_class=2, dim=4)
    got = list(src)
    assert [(r, c) for r, _, c in got] == [(i.ref, i.class_name) for i in src.list_items()]
    np.testing.assert_array_equal(got[3][1], src.load(src.list_items()[3]))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png(1))
    (tmp_path / "a" / "y.txt").write_text("?")
    with pytest.raises(ItemError, match="a/y.txt: not an image"):
        list(ImageFolderSource(str(tmp_path)))


def test_synthetic_images_any_size():
    src = SyntheticSource(num_classes=2, per_class=2, kind="images", image_size=(37, 53), seed=0)
    a = src.load(src.list_items()[0])
    assert a.shape == (37, 53, 3) and a.dtype == np.uint8
    assert src.fingerprint() == SyntheticSource(2, 2, kind="images", image_size=(37, 53), seed=0).fingerprint()

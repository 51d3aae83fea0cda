"""Bad input gives clear errors from every public entry point."""
import numpy as np
import pytest
import torch

from dml_core.metrics import evaluate_compatibility, map_at_r, opis, recall_at_k

ENTRY_POINTS = {
    "recall_at_k": lambda z, y: recall_at_k(z, y, k=1),
    "map_at_r": map_at_r,
    "opis": opis,
    "compatibility": lambda z, y: evaluate_compatibility(z, z, y),
}


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 4)), np.repeat(np.arange(4), 5)


@pytest.mark.parametrize("fn", list(ENTRY_POINTS))
def test_label_count_differs(fn, data):
    z, y = data
    with pytest.raises(ValueError, match=r"labels must be a 1-D tensor with one label per row of z: got labels of shape \(19,\) for 20 rows"):
        ENTRY_POINTS[fn](z, y[:19])


@pytest.mark.parametrize("fn", list(ENTRY_POINTS))
def test_one_class_only(fn, data):
    z, _ = data
    with pytest.raises(ValueError, match="needs at least two classes, but all 20 labels are 7"):
        ENTRY_POINTS[fn](z, np.full(20, 7))


@pytest.mark.parametrize("fn", list(ENTRY_POINTS))
def test_empty_set(fn):
    with pytest.raises(ValueError, match=r"z is empty: shape \(0, 4\)"):
        ENTRY_POINTS[fn](np.zeros((0, 4)), np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("fn", list(ENTRY_POINTS))
def test_nan_embeddings(fn, data):
    z, y = data
    z[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"z has NaN or infinite values in rows \[3\]"):
        ENTRY_POINTS[fn](z, y)


def test_float_labels_and_bad_types(data):
    z, y = data
    with pytest.raises(TypeError, match="labels must be integers"):
        recall_at_k(z, y.astype(np.float32))
    with pytest.raises(TypeError, match="z must be a torch.Tensor, NumPy array or list"):
        opis("not an array", y)


def test_gallery_errors(data):
    z, y = data
    with pytest.raises(ValueError, match=r"gallery_z has NaN"):
        recall_at_k(z, y, gallery_z=np.full_like(z, np.nan), gallery_labels=y)
    with pytest.raises(ValueError, match="gallery_z given without gallery_labels"):
        map_at_r(z, y, gallery_z=z)
    with pytest.raises(ValueError, match="exclude_self=True needs the gallery to be the same items"):
        map_at_r(z, y, gallery_z=z[:10], gallery_labels=y[:10], exclude_self=True)
    with pytest.raises(ValueError, match="no query has a relevant"):
        recall_at_k(z[:5], np.full(5, 99), gallery_z=z, gallery_labels=y)
    with pytest.raises(ValueError, match=r"every k must be between 1 and the number of gallery candidates \(19\)"):
        recall_at_k(z, y, k=20)


def test_opis_specific_errors(data):
    z, y = data
    with pytest.raises(ValueError, match="no class has two or more items"):
        opis(z, np.arange(20))
    with pytest.raises(ValueError, match="need 0 < far_lo < far_hi < 1"):
        opis(z, y, far_lo=0.2, far_hi=0.1)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        opis(z, y, eps=1.0)
    with pytest.raises(ValueError, match="leaves no worst or no rest set"):
        opis(z, np.array([0, 0] + list(range(1, 19))))  # one class with >= 2 items
    with pytest.raises(ValueError, match="zero-norm rows"):
        opis(torch.zeros(20, 4), y)

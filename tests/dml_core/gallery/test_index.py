import hashlib
import json

import numpy as np
import pytest
import torch

from dml_core.gallery import GalleryIndex, IndexFileError, IndexSpec, build_index
from tests.dml_core.metrics.helpers import clustered

K = 10


def _unit(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """20,000 gallery vectors and 1,000 unseen queries, d=64, from 300 overlapping clusters (IVF with
    nprobe=1 misses many neighbours)."""
    z, _ = clustered(300, 70, 64, spread=1.2, seed=3, dtype=np.float32)
    return z[:20000], z[20000:]


@pytest.fixture(scope="module")
def built(data):
    """Each approximate factory built once at its default parameters."""
    return {f: build_index(data[0], spec=IndexSpec(factory=f)) for f in ("IVF256,Flat", "HNSW32")}


def _recall(gi: GalleryIndex, gallery: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[float, float]:
    """Recall@k of the index for unseen queries against brute force (float64 torch matmul + topk), from
    scratch, and the tolerance for comparing it with the build's own 1,000-query estimate: four standard
    errors of the difference of two such estimates."""
    found = gi.search(queries, k).ids.numpy()  # default ids: item id = embedding row
    exact = torch.topk(torch.from_numpy(_unit(queries)) @ torch.from_numpy(_unit(gallery)).T, k, dim=1).indices
    per_query = np.array([len(set(f) & set(e)) / k for f, e in zip(found, exact.numpy())])
    return per_query.mean(), 4 * per_query.std() * np.sqrt(2 / len(queries)) + 1e-3


def test_flat_returns_brute_force_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    ids = rng.permutation(10**6)[:3000]
    q = rng.normal(size=(200, 32)).astype(np.float32)
    gi = build_index(x, ids)
    res = gi.search(q, K)
    s = torch.from_numpy(_unit(q)) @ torch.from_numpy(_unit(x)).T
    top = torch.topk(s, K, dim=1)
    np.testing.assert_array_equal(res.ids.numpy(), ids[top.indices.numpy()])
    np.testing.assert_allclose(res.similarities.numpy(), top.values.numpy(), atol=1e-5)
    assert gi.manifest.recall is None and gi.manifest.search_params == {} and gi.manifest.factory == "Flat"


@pytest.mark.parametrize("factory", ["IVF256,Flat", "HNSW32"])
def test_default_parameters_reach_recall_and_record_it(data, built, factory):
    (gallery, queries), gi = data, built[factory]
    m = gi.manifest
    assert m.tuned and list(m.search_params) == (["nprobe"] if factory.startswith("IVF") else ["efSearch"])
    rows = np.asarray(m.recall["query_rows"])
    assert m.recall["k"] == K and len(rows) == 1000 and len(set(rows.tolist())) == 1000 and m.count == 20000
    # The held-out query rows were added after the measurement, under their own ids: each finds itself.
    np.testing.assert_array_equal(gi.search(gallery[rows[:100]], 1).ids.numpy()[:, 0], rows[:100])
    # Recomputed independently on 1,000 unseen queries: at least 0.95, and what the build recorded up to
    # the sampling error of two 1,000-query estimates.
    recall, tolerance = _recall(gi, gallery, queries)
    assert recall >= 0.95
    assert m.recall["value"] == pytest.approx(recall, abs=tolerance)


def test_recall_is_measured_not_assumed(data):
    """At nprobe=1 the same data is hard: the build records the low recall it really has."""
    gallery, queries = data
    gi = build_index(gallery, spec=IndexSpec(factory="IVF256,Flat", nprobe=1))
    m = gi.manifest
    assert not m.tuned and m.search_params == {"nprobe": 1}
    assert m.recall["value"] < 0.9
    recall, tolerance = _recall(gi, gallery, queries)
    assert m.recall["value"] == pytest.approx(recall, abs=tolerance)
    with pytest.raises(ValueError, match="below min_recall 0.95"):
        build_index(gallery[:5000], spec=IndexSpec(factory="IVF64,Flat", nprobe=1, min_recall=0.95))


def _small_ivf():
    x, _ = clustered(20, 100, 16, spread=1.0, seed=1, dtype=np.float32)
    return x, build_index(x, np.arange(len(x)) * 7 + 3, IndexSpec(factory="IVF16,Flat"))


def _assert_round_trip(gi: GalleryIndex, directory: str, x: np.ndarray):
    url = gi.save(directory, name="ivf")
    assert url == f"{directory}/ivf.json"
    back = GalleryIndex.load(directory, name="ivf")
    assert back.manifest.search_params == gi.manifest.search_params and back.manifest.files == gi.manifest.files
    assert back.manifest.recall == gi.manifest.recall and back.manifest.count == len(x)
    a, b = gi.search(x[:50], K), back.search(x[:50], K)
    np.testing.assert_array_equal(a.ids.numpy(), b.ids.numpy())
    np.testing.assert_array_equal(a.similarities.numpy(), b.similarities.numpy())
    assert set(b.ids.flatten().tolist()) <= set((np.arange(len(x)) * 7 + 3).tolist())


def test_save_load_round_trip_local(tmp_path):
    x, gi = _small_ivf()
    _assert_round_trip(gi, str(tmp_path / "gallery"), x)
    saved = json.loads((tmp_path / "gallery" / "ivf.json").read_text())
    assert saved["metric"] == "inner_product" and saved["dim"] == 16 and "ids[i]" in saved["id_mapping"]


@pytest.mark.slow
def test_save_load_round_trip_s3(s3_server):
    x, gi = _small_ivf()
    _assert_round_trip(gi, s3_server.url("index-test/gallery"), x)


def test_corrupt_or_truncated_index_file_is_named(tmp_path):
    x, gi = _small_ivf()
    d = tmp_path / "g"
    gi.save(str(d))
    f = d / "index.faiss"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match=f"index file {f} is corrupt or truncated"):
        GalleryIndex.load(str(d))
    # The same garbage with a manifest that agrees with it: FAISS itself refuses it, and the file is named.
    manifest = json.loads((d / "index.json").read_text())
    manifest["files"]["index"].update(bytes=len(data) // 2, sha256=hashlib.sha256(data[: len(data) // 2]).hexdigest())
    (d / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=f"index file {f} could not be read by FAISS"):
        GalleryIndex.load(str(d))
    f.unlink()
    with pytest.raises(FileNotFoundError, match=f"index file {f} is missing"):
        GalleryIndex.load(str(d))
    with pytest.raises(FileNotFoundError, match="no index manifest at .*other.json"):
        GalleryIndex.load(str(d), name="other")


def test_query_dimension_mismatch_names_both_dims(tmp_path):
    x, gi = _small_ivf()
    gi.save(str(tmp_path))
    back = GalleryIndex.load(str(tmp_path))
    with pytest.raises(ValueError, match=r"dimension 17, the index .*index.faiss has dimension 16"):
        back.search(np.ones((2, 17), dtype=np.float32))


def test_bad_build_input():
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="invalid FAISS index factory string 'IVFX'"):
        build_index(x, spec=IndexSpec(factory="IVFX"))
    with pytest.raises(ValueError, match="needs at least 256 vectors to train its 256 centroids; the gallery has 100"):
        build_index(x, spec=IndexSpec(factory="IVF256,Flat"))
    with pytest.raises(ValueError, match="ids must be unique"):
        build_index(x, np.zeros(100, dtype=np.int64))
    with pytest.raises(ValueError, match="zero-norm rows"):
        build_index(np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="index device must be one of"):
        IndexSpec(device="tpu")


def test_incomplete_manifest_is_named(tmp_path):
    x, gi = _small_ivf()
    gi.save(str(tmp_path))
    manifest = json.loads((tmp_path / "index.json").read_text())
    del manifest["files"]["ids"]["sha256"]
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=f"{tmp_path}/index.json: files.ids must give the name, bytes and sha256"):
        GalleryIndex.load(str(tmp_path))
    del manifest["dim"]
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match=r"index manifest lacks the field\(s\) \['dim'\]"):
        GalleryIndex.load(str(tmp_path))

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from dml_core.metrics import evaluate_retrieval, map_at_r, recall_at_k
from tests.dml_core.metrics.helpers import clustered, random_data


def oracle(q, ql, g, gl, ks, exclude_self):
    """Brute force over the full similarity matrix: per query, sort the gallery, loop over ranks."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    recalls, aps = {k: [] for k in ks}, []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if not (exclude_self and j == i)]
        cand.sort(key=lambda j: -sims[i, j])
        rel = [gl[j] == ql[i] for j in cand]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            recalls[k].append(float(any(rel[:k])))
        hits, ap = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
    return {k: np.mean(v) for k, v in recalls.items()}, float(np.mean(aps)), len(aps)


def pml(q, ql, g=None, gl=None):
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    if g is None:  # reference defaults to the queries, ref_includes_query=True: the query itself is excluded
        acc = calc.get_accuracy(norm(q), torch.from_numpy(ql))
    else:
        acc = calc.get_accuracy(norm(q), torch.from_numpy(ql), norm(g), torch.from_numpy(gl), ref_includes_query=False)
    return acc["precision_at_1"], acc["mean_average_precision_at_r"]


DATASETS = {
    "random": lambda: random_data(250, 12, 16, seed=1),
    "clustered": lambda: clustered(15, 12, 24, spread=0.9, seed=2),
    "clustered_uneven_with_singletons": lambda: clustered(8, [1, 2, 40, 25, 1, 10, 30, 5], 12, spread=1.2, seed=3),
}


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_leave_one_out_matches_oracle_and_pml(name, backend):
    z, y = DATASETS[name]()
    res = evaluate_retrieval(z, y, ks=(1, 2, 5), backend=backend, max_chunk_elements=4096)
    rec, ap, n = oracle(z, y, z, y, (1, 2, 5), exclude_self=True)
    for k in (1, 2, 5):
        assert res.recall[k] == pytest.approx(rec[k], abs=1e-12)
    assert res.map_at_r == pytest.approx(ap, abs=1e-12)
    assert res.num_queries == n and res.num_skipped_queries == len(y) - n
    p1, mapr = pml(z, y)
    assert res.recall[1] == pytest.approx(p1, abs=1e-9)
    assert res.map_at_r == pytest.approx(mapr, abs=1e-6)
    # the stable functional names give the same numbers
    assert recall_at_k(z, y, k=2, backend=backend) == pytest.approx(rec[2], abs=1e-12)
    assert map_at_r(torch.from_numpy(z), torch.from_numpy(y), backend=backend) == pytest.approx(ap, abs=1e-12)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_query_gallery_matches_oracle_and_pml(backend):
    zq, yq = clustered(10, 6, 16, spread=1.0, seed=4)
    zg, yg = clustered(10, 20, 16, spread=1.0, seed=4)  # same centres (same seed), different draws
    yq[:3] = 99  # queries whose label is absent from the gallery are skipped
    res = evaluate_retrieval(zq, yq, ks=(1, 3), gallery_z=zg, gallery_labels=yg, backend=backend)
    rec, ap, n = oracle(zq, yq, zg, yg, (1, 3), exclude_self=False)
    assert res.mode == "query_gallery" and res.num_queries == n == len(yq) - 3
    assert res.recall[1] == pytest.approx(rec[1], abs=1e-12) and res.recall[3] == pytest.approx(rec[3], abs=1e-12)
    assert res.map_at_r == pytest.approx(ap, abs=1e-12)
    p1, mapr = pml(zq[3:], yq[3:], zg, yg)
    assert res.recall[1] == pytest.approx(p1, abs=1e-9) and res.map_at_r == pytest.approx(mapr, abs=1e-6)


def test_cross_model_leave_one_out_matches_oracle():
    z_old, y = clustered(12, 10, 16, seed=6)
    z_new = z_old + 0.8 * np.random.default_rng(7).normal(size=z_old.shape)
    res = evaluate_retrieval(z_new, y, ks=(1,), gallery_z=z_old, gallery_labels=y, exclude_self=True)
    rec, ap, _ = oracle(z_new, y, z_old, y, (1,), exclude_self=True)
    assert res.mode == "cross_leave_one_out"
    assert res.recall[1] == pytest.approx(rec[1], abs=1e-12) and res.map_at_r == pytest.approx(ap, abs=1e-12)


def test_large_r_with_tiny_chunks():
    # One class with 300 items: R = 299 neighbours for its queries, processed in 1-row chunks.
    z, y = clustered(3, [300, 20, 5], 8, spread=2.0, seed=8)
    res = evaluate_retrieval(z, y, ks=(1,), backend="torch", max_chunk_elements=200)
    _, ap, _ = oracle(z, y, z, y, (1,), exclude_self=True)
    assert res.map_at_r == pytest.approx(ap, abs=1e-12)


def test_top1_correct_per_query_matches_brute_force():
    z, y = clustered(10, 8, 8, spread=1.5, seed=9)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = zn @ zn.T
    np.fill_diagonal(s, -np.inf)
    expected = y[np.argmax(s, axis=1)] == y
    res = evaluate_retrieval(z, y, ks=(1,))
    np.testing.assert_array_equal(res.top1_correct, expected)


def test_to_dict_roundtrip():
    z, y = clustered(5, 6, 8, seed=10)
    res = evaluate_retrieval(z, y, ks=(1, 4))
    back = type(res).from_dict(res.to_dict())
    assert back.recall == res.recall and back.map_at_r == res.map_at_r and back.mode == res.mode

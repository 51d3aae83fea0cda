"""The backfill curve (METHODS 6.1) against a brute-force NumPy leave-one-out at every fraction, its endpoints
against the cross-model metrics, and the three orders it compares."""
import numpy as np
import pytest
import torch

from dml_core.metrics.backfill_curve import FRACTIONS, backfill_curve, backfill_order, backfilled_count
from dml_core.metrics.retrieval import evaluate_retrieval
from tests.dml_core.metrics.helpers import clustered


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive(query, gallery, labels, metric):
    """Leave-one-out top-1 or MAP@R, query i against every gallery row but row i, by sorting all of them."""
    q, g = _normalise(query), _normalise(gallery)
    scores = []
    for i in range(len(q)):
        others = np.delete(np.arange(len(g)), i)
        ranked = others[np.argsort(-(g[others] @ q[i]), kind="stable")]
        rel = labels[ranked] == labels[i]
        if metric == "recall_at_1":
            scores.append(float(rel[0]))
            continue
        r = int(rel.sum())
        hits = rel[:r]
        scores.append(float((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r))
    return float(np.mean(scores))


@pytest.fixture
def items():
    new, labels = clustered(6, 12, 8, spread=0.8, seed=1)
    rng = np.random.default_rng(2)
    transformed = new + rng.normal(scale=rng.uniform(0.2, 2.0, size=(len(new), 1)), size=new.shape)
    return new, _normalise(transformed), labels, np.arange(100, 100 + len(new))[rng.permutation(len(new))]


@pytest.mark.parametrize("metric", ["recall_at_1", "map_at_r"])
def test_curve_is_the_brute_force_leave_one_out_at_every_fraction(items, metric):
    new, transformed, labels, ids = items
    order = backfill_order("random", ids, seed=3)
    curve = backfill_curve(new, labels, new, transformed, order, metric=metric)
    assert len(curve.fractions) == 21 and curve.fractions[1] == pytest.approx(0.05)
    want = []
    for f in FRACTIONS:
        gallery = transformed.copy()
        done = order[:round(f * len(new))]
        gallery[done] = new[done]
        want.append(_naive(new, gallery, labels, metric))
    np.testing.assert_allclose(curve.values, want, atol=1e-9)
    assert curve.area == pytest.approx(np.mean(want)) and curve.metric == metric


def test_endpoints_are_the_cross_model_metrics(items):
    new, transformed, labels, ids = items
    order = backfill_order("oracle", ids, new=new, transformed=transformed)
    curve = backfill_curve(torch.tensor(new), labels, new, transformed, order)

    def m(gallery):  # M(new, gallery), leave-one-out
        return evaluate_retrieval(new, labels, gallery_z=gallery, gallery_labels=labels, exclude_self=True).map_at_r

    assert curve.values[0] == pytest.approx(m(transformed)) and curve.values[-1] == pytest.approx(m(new))
    assert curve.values[-1] > curve.values[0]  # the noisy transformed gallery is worse


def test_custom_fractions_and_rounding():
    # round(f * N) as a partial backfill's budget: halves to even (1.5 -> 2, 4.5 -> 4), float noise absorbed
    assert [backfilled_count(f, 30) for f in (0, 0.05, 0.15, 1)] == [0, 2, 4, 30]
    assert backfilled_count(0.15, 100) == 15 and backfilled_count(0.07, 10) == 1
    new, labels = clustered(3, 5, 4, seed=0)
    curve = backfill_curve(new, labels, new, new, np.arange(15), fractions=[0.0, 1.0], metric="recall_at_1")
    assert list(curve.fractions) == [0.0, 1.0] and curve.values[0] == curve.values[1]


def test_orders(items):
    new, transformed, labels, ids = items
    log_var = np.round(np.random.default_rng(0).normal(size=len(ids)), 1)  # rounded: ties to break by id
    order = backfill_order("uncertainty", ids, log_var=torch.tensor(log_var))
    assert sorted(order) == list(range(len(ids)))
    pairs = list(zip(-log_var[order], ids[order]))
    assert pairs == sorted(pairs)  # log_var descending, then id ascending

    oracle = backfill_order("oracle", ids, new=new, transformed=transformed)
    dist = np.linalg.norm(transformed - new, axis=1)[oracle]
    assert sorted(oracle) == list(range(len(ids))) and np.all(np.diff(dist) <= 0)

    rand = backfill_order("random", ids, seed=5)
    assert sorted(rand) == list(range(len(ids)))
    assert np.array_equal(rand, backfill_order("random", ids, seed=5))
    assert not np.array_equal(rand, backfill_order("random", ids, seed=6))
    shuffled = np.random.default_rng(1).permutation(len(ids))  # the same items in other rows: the same item order
    assert np.array_equal(ids[shuffled][backfill_order("random", ids[shuffled], seed=5)], ids[rand])


def test_bad_inputs(items):
    new, transformed, labels, ids = items
    with pytest.raises(ValueError, match="needs log_var"):
        backfill_order("uncertainty", ids)
    with pytest.raises(ValueError, match="unknown backfill order"):
        backfill_order("fifo", ids)
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(new, labels, new, transformed, np.zeros(len(ids), dtype=int))
    with pytest.raises(ValueError, match="metric"):
        backfill_curve(new, labels, new, transformed, np.arange(len(ids)), metric="recall_at_5")

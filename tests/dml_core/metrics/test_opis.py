import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from dml_core.metrics import OpisResult, opis
from tests.dml_core.metrics.helpers import clustered


def u_fbeta(tar, trr, beta):
    if tar == 0 and trr == 0:
        return 0.0
    return (1 + beta ** 2) * tar * trr / (beta ** 2 * trr + tar)


def opis_oracle(z, labels, far_lo=1e-3, far_hi=1e-1, num_thresholds=101, beta=1.0, eps=0.1):
    """METHODS 5 written out directly: all pairs, loops over thresholds and classes, plain NumPy."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(2.0 - 2.0 * z @ z.T, 0.0))
    iu = np.triu_indices(len(z), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    pos_all, neg_all = d[iu][same], d[iu][~same]
    t_lo, t_hi = np.quantile(neg_all, [far_lo, far_hi])
    ts = np.linspace(t_lo, t_hi, num_thresholds)
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
    per_class = []
    for c in classes:
        inside = labels == c
        block = d[np.ix_(inside, inside)]
        per_class.append((block[np.triu_indices(inside.sum(), 1)], d[np.ix_(inside, ~inside)].ravel()))
    uc = np.zeros((len(classes), len(ts)))
    ub = np.zeros(len(ts))
    for k, t in enumerate(ts):
        ub[k] = u_fbeta(np.mean(pos_all <= t), np.mean(neg_all > t), beta)
        for i, (pos, neg) in enumerate(per_class):
            uc[i, k] = u_fbeta(np.mean(pos <= t), np.mean(neg > t), beta)
    value = np.mean([np.mean((uc[i] - ub) ** 2) for i in range(len(classes))])
    order = np.argsort(uc.mean(axis=1), kind="stable")
    n_worst = math.ceil(Fraction(repr(eps)) * len(classes))  # exact arithmetic on the decimal eps
    worst, rest = order[:n_worst], order[n_worst:]
    eps_value = np.mean((uc[worst].mean(axis=0) - uc[rest].mean(axis=0)) ** 2)
    return dict(opis=value, eps_opis=eps_value, thresholds=ts, class_utility=uc, pooled_utility=ub,
                classes=classes, num_pos=len(pos_all), num_neg=len(neg_all))


def small_set(seed=0):
    # uneven classes with different spreads, two singleton classes (skipped but still negatives)
    z, y = clustered(9, [12, 20, 7, 1, 15, 2, 1, 30, 9], 12, spread=[0.5, 1.0, 1.5, 1, 0.8, 1, 1, 1.2, 0.3], seed=seed)
    return z, y


@pytest.mark.parametrize("kwargs", [{}, dict(beta=2.0, eps=0.25, num_thresholds=37),
                                    dict(far_lo=0.01, far_hi=0.5, beta=0.5, eps=0.3)])
@pytest.mark.parametrize("buffer", [1 << 24, 10])  # all negatives kept / two-pass histogram refine
def test_exact_matches_all_pairs_oracle(kwargs, buffer):
    z, y = small_set()
    res = opis(z, y, max_calibration_buffer=buffer, max_chunk_elements=1500, **kwargs)
    ref = opis_oracle(z, y, **kwargs)
    assert res.calibration["method"] == ("all_values" if buffer > 10 else "histogram_refine")
    np.testing.assert_allclose(res.thresholds, ref["thresholds"], rtol=1e-12)
    np.testing.assert_allclose(res.class_utility, ref["class_utility"], atol=1e-12)
    np.testing.assert_allclose(res.pooled_utility, ref["pooled_utility"], atol=1e-12)
    assert res["opis"] == pytest.approx(ref["opis"], rel=1e-9, abs=1e-14)
    assert res["eps_opis"] == pytest.approx(ref["eps_opis"], rel=1e-9, abs=1e-14)
    assert res.class_labels == [int(c) for c in ref["classes"]]
    assert res.num_skipped_classes == 2 and res.num_classes == 7
    assert res.num_pos_pairs == ref["num_pos"] and res.num_neg_pairs == ref["num_neg"]
    assert res.opis > 1e-3  # the set is far from consistent: the comparison is not between zeros


def test_sampled_path_records_sizes_and_is_exact_per_class_with_all_negatives():
    z, y = small_set(1)
    exact = opis(z, y)
    sampled = opis(z, y, max_neg_per_class=40, num_calibration_pairs=20000, seed=3)
    assert sampled.method == "sampled" and exact.method == "exact"
    sizes = np.bincount(y)
    ev = sizes[sizes >= 2]
    pairs = sampled.sampling["neg_pairs_per_class"]
    # every member gets 40 draws minus those that fell in its own class
    assert np.all(pairs <= 40 * ev) and np.all(pairs >= 40 * ev * (1 - 3 * ev / len(y)) - 20)
    assert sampled.sampling["total_neg_pairs_sampled"] == pairs.sum() and not sampled.sampling["exact_negatives"]
    assert sampled.sampling["num_calibration_pairs"] == 20000 and sampled.sampling["seed"] == 3
    assert sampled.num_pos_pairs == exact.num_pos_pairs and sampled.num_neg_pairs == exact.num_neg_pairs
    again = opis(z, y, max_neg_per_class=40, num_calibration_pairs=20000, seed=3)
    assert again.opis == sampled.opis  # seeded
    assert abs(sampled.opis - exact.opis) < 0.3 * exact.opis
    # a cap reaching every class's outside items uses all negatives: per-class curves exact at its thresholds
    full = opis(z, y, max_neg_per_class=len(y) - ev.min(), num_calibration_pairs=20000, seed=3)
    assert full.sampling["exact_negatives"]
    np.testing.assert_array_equal(full.sampling["neg_pairs_per_class"], ev * (len(y) - ev))
    ref = opis_oracle_at(z, y, full.thresholds)
    # interior thresholds exactly; the two range ends are sampled pair distances themselves, where one
    # pair computed to a different last bit (gathered rows vs the full matmul) may fall on either side
    np.testing.assert_allclose(full.class_utility[:, 1:-1], ref[:, 1:-1], atol=1e-12)
    np.testing.assert_allclose(full.class_utility, ref, atol=1e-4)


def opis_oracle_at(z, labels, ts, beta=1.0):
    """Per-class utility at given thresholds, all pairs, loops (for the sampled path's class curves)."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(2.0 - 2.0 * z @ z.T, 0.0))
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
    out = np.zeros((len(classes), len(ts)))
    for i, c in enumerate(classes):
        inside = labels == c
        pos = d[np.ix_(inside, inside)][np.triu_indices(inside.sum(), 1)]
        neg = d[np.ix_(inside, ~inside)].ravel()
        for k, t in enumerate(ts):
            out[i, k] = u_fbeta(np.mean(pos <= t), np.mean(neg > t), beta)
    return out


def symmetric_set(n_classes=5, per_class=12, block=64, seed=0):
    """Classes that are cyclic block-shifts of one configuration: the shift is an isometry mapping class c
    to c+1, so every class has the same positive AND negative distance multisets. Coordinates are +-1/8
    on 64 entries (norm exactly 1), so every dot product is exact in floating point."""
    rng = np.random.default_rng(seed)
    dim = n_classes * block
    proto = rng.choice([-1.0, 1.0], size=block)
    base = np.zeros((per_class, dim))
    for i in range(per_class):
        inside = rng.choice(block, 48, replace=False)
        base[i, inside] = proto[inside] * rng.choice([1.0, -1.0], size=48, p=[0.85, 0.15])
        outside = block + rng.choice(dim - block, 16, replace=False)
        base[i, outside] = rng.choice([-1.0, 1.0], size=16)
    base /= 8.0
    z = np.concatenate([np.roll(base, c * block, axis=1) for c in range(n_classes)])
    return z, np.repeat(np.arange(n_classes), per_class)


def test_opis_is_zero_when_all_classes_are_equivalent_and_grows_with_a_shift():
    z, y = symmetric_set()
    for dtype in (np.float64, np.float32):
        res = opis(z.astype(dtype), y)
        assert res.opis == pytest.approx(0.0, abs=1e-15) and res.eps_opis == pytest.approx(0.0, abs=1e-15)
    ref = opis_oracle(z, y)
    assert ref["opis"] == pytest.approx(0.0, abs=1e-15)
    assert res.t_hi > res.t_lo  # a real range, not a degenerate one
    values = []
    for alpha in (0.3, 1.0):  # pull class 0 towards its mean: its positives shrink
        zs = z.copy()
        zs[y == 0] += alpha * zs[y == 0].mean(axis=0)
        res = opis(zs, y)
        assert res.opis == pytest.approx(opis_oracle(zs, y)["opis"], rel=1e-9)
        assert res.worst_classes != [0]  # class 0 got better, not worse
        values.append(res.opis)
    assert 1e-4 < values[0] < values[1]


def test_mapping_interface_and_json():
    z, y = small_set(2)
    res = opis(z, y, num_thresholds=11)
    assert isinstance(res, OpisResult) and set(["opis", "eps_opis", "thresholds"]) <= set(res.keys())
    light = res.to_dict()
    assert "class_utility" not in light and light["opis"] == res.opis
    full = OpisResult.from_dict(res.to_dict(include_curves=True))
    np.testing.assert_array_equal(full.class_utility, res.class_utility)
    assert full.opis == res.opis and len(full.thresholds) == 11
    with pytest.raises(KeyError):
        res["nope"]


@pytest.mark.slow
def test_sampled_within_5_percent_of_exact_on_20000_items():
    torch.set_num_threads(2)
    spreads = np.random.default_rng(11).uniform(0.5, 1.5, size=100)
    z, y = clustered(100, 200, 32, spread=spreads, seed=12, dtype=np.float32)
    exact = opis(z, y)
    sampled = opis(z, y, max_neg_per_class=1000, seed=0)
    assert exact.calibration["method"] == "histogram_refine"
    assert sampled.opis == pytest.approx(exact.opis, rel=0.05)
    assert sampled.eps_opis == pytest.approx(exact.eps_opis, rel=0.05)
    assert sampled.t_lo == pytest.approx(exact.t_lo, rel=0.01) and sampled.t_hi == pytest.approx(exact.t_hi, rel=0.01)


def test_chunking_does_not_change_results():
    z, y = small_set(4)
    for kw in ({}, dict(max_neg_per_class=10 ** 6, num_calibration_pairs=5000)):
        big = opis(z, y, **kw)
        tiny = opis(z, y, max_chunk_elements=50, **kw)  # 1-row chunks, large-class paths
        np.testing.assert_allclose(tiny.class_utility, big.class_utility, atol=1e-12)
        np.testing.assert_allclose(tiny.pooled_utility, big.pooled_utility, atol=1e-12)
        assert tiny.opis == pytest.approx(big.opis, rel=1e-9)


# ---- issue 10, section 3: sampled exactness reported only when exact; eps-OPIS ranking and worst-set size ----

def test_sampled_path_with_every_negative_is_the_exact_path():
    z, y = small_set(1)
    exact = opis(z, y)
    sizes = np.bincount(y)
    cap = len(y) - int(sizes.max())  # the smallest cap that reaches every negative of every class
    full = opis(z, y, max_neg_per_class=cap, num_calibration_pairs=20000, seed=3)
    assert full.method == "sampled" and full.sampling["exact_negatives"] and full.sampling["exact_calibration"]
    assert full.sampling["num_calibration_pairs"] == 0 and full.calibration["method"] == exact.calibration["method"]
    assert (full.t_lo, full.t_hi) == (exact.t_lo, exact.t_hi)
    np.testing.assert_allclose(full.thresholds, exact.thresholds, rtol=0, atol=0)
    np.testing.assert_allclose(full.class_utility, exact.class_utility, atol=1e-12)
    np.testing.assert_allclose(full.pooled_utility, exact.pooled_utility, atol=1e-12)
    assert full.opis == pytest.approx(exact.opis, rel=1e-9) and full.eps_opis == pytest.approx(exact.eps_opis, rel=1e-9)
    # one below: sampled negatives and a sampled calibration range, reported as such
    part = opis(z, y, max_neg_per_class=cap - 1, num_calibration_pairs=20000, seed=3)
    assert not part.sampling["exact_negatives"] and not part.sampling["exact_calibration"]
    assert part.sampling["num_calibration_pairs"] == 20000 and part.calibration["method"] == "sampled"


def test_worst_set_size_is_exact():
    from dml_core.metrics.opis import num_worst_classes, opis_from_curves
    assert 0.07 * 100 != 7 and num_worst_classes(0.07, 100) == 7
    assert num_worst_classes(0.1, 30) == 3 and num_worst_classes(0.3000000000001, 10) == 4
    for k in range(1, 100):
        for c in (1, 3, 7, 10, 30, 100, 1000):
            assert num_worst_classes(k / 100, c) == -(-k * c // 100)
    curves = np.linspace(0.0, 1.0, 100)[:, None] * np.ones((1, 5))
    _, _, worst = opis_from_curves(curves, curves.mean(axis=0), 0.07)
    assert sorted(worst.tolist()) == list(range(7))
    _, _, worst = opis_from_curves(curves[:10], curves[:10].mean(axis=0), 0.3000000000001)
    assert len(worst) == 4


def test_tied_classes_rank_by_label():
    from dml_core.metrics.opis import opis_from_curves
    v = np.array([0.64, 0.27, 0.04, 0.02])
    a, b = v, v[::-1].copy()  # the same values: tied mean utility, but the float means differ in the last bit
    lo, hi = sorted([a, b], key=lambda r: r.mean())
    assert lo.mean() < hi.mean()
    curves = np.stack([hi, lo, np.full(4, 0.9)])  # label 0 holds the bitwise-larger mean
    _, _, worst = opis_from_curves(curves, curves.mean(axis=0), 0.3)
    assert worst.tolist() == [0]
    curves = np.stack([np.full(4, 0.9), lo, hi])
    assert opis_from_curves(curves, curves.mean(axis=0), 0.3)[2].tolist() == [1]
    # a real difference beyond float rounding still decides
    curves = np.stack([hi + 1e-9, lo, np.full(4, 0.9)])
    assert opis_from_curves(curves, curves.mean(axis=0), 0.3)[2].tolist() == [1]

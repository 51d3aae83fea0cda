import numpy as np
import pytest

from dml_core.metrics import CompatibilityResult, evaluate_compatibility, evaluate_retrieval
from tests.dml_core.metrics.helpers import clustered


def top1_correct(q, g, yq, yg, exclude_self):
    """Brute force: label of the most similar gallery item equals the query's."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = q @ g.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return yg[np.argmax(s, axis=1)] == yq


def models(seed=0):
    """old: noisy clusters; new: the same space with less noise, partly re-drawn (an improved, compatible
    model that still flips a few queries); rand: an unrelated random model."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(30), 12)
    centres = rng.normal(size=(30, 16))
    noise = rng.normal(size=(len(labels), 16))
    old = centres[labels] + 0.9 * noise
    new = centres[labels] + 0.45 * noise + 0.3 * rng.normal(size=noise.shape)
    rand = rng.normal(size=old.shape)
    return old, new, rand, labels


def test_model_against_itself():
    old, _, _, y = models()
    res = evaluate_compatibility(old, old.copy(), y)
    for s in res.scores.values():
        assert s.new_old == s.old_old == s.new_new
        assert s.criterion is False  # not strictly better
        assert s.update_gain is None  # 0 / 0
    assert res.flips["new_old"].nfr == 0.0 and res.flips["new_old"].flips == 0
    assert res.flips["new_new"].nfr == 0.0


def test_improved_model_matches_brute_force_and_passes_criterion():
    old, new, _, y = models()
    res = evaluate_compatibility(old, new, y)
    assert res.mode == "cross_leave_one_out" and res.ref_model == "new" and res.num_queries == len(y)
    r = res.scores["recall_at_1"]
    c_oo, c_nn, c_no = (top1_correct(a, b, y, y, True) for a, b in ((old, old), (new, new), (new, old)))
    assert r.old_old == pytest.approx(c_oo.mean()) and r.new_new == pytest.approx(c_nn.mean())
    assert r.new_old == pytest.approx(c_no.mean())
    assert r.criterion and r.update_gain == pytest.approx((c_no.mean() - c_oo.mean()) / (c_nn.mean() - c_oo.mean()))
    m = res.scores["map_at_r"]
    assert m.new_old == pytest.approx(evaluate_retrieval(new, y, gallery_z=old, gallery_labels=y, exclude_self=True).map_at_r)
    flips = int((c_oo & ~c_no).sum())
    f = res.flips["new_old"]
    assert f.flips == flips and f.nfr == pytest.approx(flips / len(y))
    assert f.nfi == pytest.approx(flips / (~c_no).sum())
    assert res.flips["new_new"].flips == int((c_oo & ~c_nn).sum())


def test_random_new_model_fails_the_criterion():
    old, _, rand, y = models()
    res = evaluate_compatibility(old, rand, y)
    for s in res.scores.values():
        assert s.criterion is False and s.new_old < s.old_old
    assert res.flips["new_old"].nfr > 0.3


def test_reference_model_is_used_for_the_gain():
    old, new, _, y = models()
    ref = new + 0.1 * np.random.default_rng(5).normal(size=new.shape)
    res = evaluate_compatibility(old, new, y, ref_query=ref)
    s = res.scores["map_at_r"]
    assert res.ref_model == "ref" and s.ref_model == "ref"
    ref_map = evaluate_retrieval(ref, y).map_at_r
    assert s.ref_ref == pytest.approx(ref_map)
    assert s.update_gain == pytest.approx((s.new_old - s.old_old) / (ref_map - s.old_old))


def test_query_gallery_split():
    old, new, _, y = models(1)
    q, g = np.arange(len(y)) % 4 == 0, np.arange(len(y)) % 4 != 0
    res = evaluate_compatibility(old[q], new[q], y[q], old_gallery=old[g], new_gallery=new[g], gallery_labels=y[g])
    assert res.mode == "query_gallery" and res.num_queries == q.sum()
    c_oo = top1_correct(old[q], old[g], y[q], y[g], False)
    c_no = top1_correct(new[q], old[g], y[q], y[g], False)
    assert res.scores["recall_at_1"].new_old == pytest.approx(c_no.mean())
    assert res.flips["new_old"].flips == int((c_oo & ~c_no).sum())
    with pytest.raises(ValueError, match="needs old_gallery, new_gallery and gallery_labels together"):
        evaluate_compatibility(old[q], new[q], y[q], old_gallery=old[g])


def test_roundtrip():
    old, new, _, y = models()
    res = evaluate_compatibility(old, new, y)
    back = type(res).from_dict(res.to_dict())
    assert back.to_dict() == res.to_dict()


# ---- issue 10, section 3: update gain is None, with its reason, when M(ref,ref) <= M(old,old) ----

def test_update_gain_is_none_when_the_reference_does_not_improve():
    from dml_core.metrics import CrossModelScores
    # a new model that regresses on every setting: (new_old - old_old) / (new_new - old_old) would be 1.0
    s = CrossModelScores.build("recall_at_1", old_old=0.5, new_new=0.4, new_old=0.4)
    assert s.update_gain is None and not s.criterion
    assert "recall_at_1(new,new) = 0.4 <= recall_at_1(old,old) = 0.5" in s.update_gain_reason
    # with a reference model, the reference decides
    s = CrossModelScores.build("map_at_r", old_old=0.5, new_new=0.9, new_old=0.6, ref_ref=0.45)
    assert s.update_gain is None and s.ref_model == "ref" and "map_at_r(ref,ref)" in s.update_gain_reason
    s = CrossModelScores.build("map_at_r", old_old=0.5, new_new=0.4, new_old=0.6, ref_ref=0.7)
    assert s.update_gain == pytest.approx(0.5) and s.update_gain_reason is None
    # equal within the 1e-9 tolerance: no improvement either
    s = CrossModelScores.build("recall_at_1", old_old=0.28, new_new=0.28 + 1e-12, new_old=0.28)
    assert s.update_gain is None and s.update_gain_reason


def test_regressing_model_reports_no_gain():
    old, new, _, y = models()
    res = evaluate_compatibility(new, old, y)  # the worse model as the "new" one
    for s in res.scores.values():
        assert s.new_new < s.old_old and s.new_old < s.old_old
        assert s.update_gain is None and "does not improve" in s.update_gain_reason
    back = CompatibilityResult.from_dict(res.to_dict())
    assert back.scores["recall_at_1"].update_gain_reason == res.scores["recall_at_1"].update_gain_reason


def test_summary_puts_flips_of_both_settings_next_to_the_criterion():
    old, new, _, y = models()
    res = evaluate_compatibility(old, new, y)
    c_oo, c_nn, c_no = (top1_correct(a, b, y, y, True) for a, b in ((old, old), (new, new), (new, old)))
    summary = res.to_dict()["summary"]
    assert summary["recall_at_1"] == {"criterion": True, "new_old": pytest.approx(c_no.mean()),
                                      "old_old": pytest.approx(c_oo.mean())}
    assert summary["map_at_r"]["criterion"] == res.scores["map_at_r"].criterion
    assert (c_oo & ~c_no).sum() > 0 and (c_oo & ~c_nn).sum() > 0  # both settings flip some queries
    assert summary["nfr_new_old"] == pytest.approx((c_oo & ~c_no).sum() / len(y))
    assert summary["nfi_new_old"] == pytest.approx((c_oo & ~c_no).sum() / (~c_no).sum())
    assert summary["nfr_new_new"] == pytest.approx((c_oo & ~c_nn).sum() / len(y))
    assert summary["nfi_new_new"] == pytest.approx((c_oo & ~c_nn).sum() / (~c_nn).sum())
    assert CompatibilityResult.from_dict(res.to_dict()).to_dict() == res.to_dict()


# ---- the transformed gallery h(old) (METHODS 6, 6.1) ----

def test_transformed_gallery_matches_brute_force_leave_one_out():
    old, new, _, y = models()
    h_old = new + 0.5 * np.random.default_rng(7).normal(size=new.shape)  # an imperfect transformation of old
    res = evaluate_compatibility(old, new, y, transformed_gallery=h_old)
    c_oo, c_nt = top1_correct(old, old, y, y, True), top1_correct(new, h_old, y, y, True)
    s = res.scores["recall_at_1"]
    assert s.new_transformed == pytest.approx(c_nt.mean()) and s.new_transformed != s.new_old
    assert res.scores["map_at_r"].new_transformed == pytest.approx(
        evaluate_retrieval(new, y, gallery_z=h_old, gallery_labels=y, exclude_self=True).map_at_r)
    f = res.flips["new_transformed"]
    flips = int((c_oo & ~c_nt).sum())
    assert flips > 0 and f.setting == "new_transformed" and f.flips == flips
    assert f.nfr == pytest.approx(flips / len(y)) and f.nfi == pytest.approx(flips / (~c_nt).sum())
    assert res.summary()["recall_at_1"]["new_transformed"] == s.new_transformed
    assert res.summary()["nfr_new_transformed"] == f.nfr
    # a perfect h (h(old) = new): self is excluded, so M(new, h(old)) is M(new,new), not 1
    perfect = evaluate_compatibility(old, new, y, transformed_gallery=new.copy()).scores["recall_at_1"]
    assert perfect.new_transformed == perfect.new_new < 1.0


def test_transformed_gallery_in_a_query_gallery_split():
    old, new, _, y = models(1)
    h_old = new + 0.5 * np.random.default_rng(8).normal(size=new.shape)
    q, g = np.arange(len(y)) % 4 == 0, np.arange(len(y)) % 4 != 0
    res = evaluate_compatibility(old[q], new[q], y[q], old_gallery=old[g], new_gallery=new[g], gallery_labels=y[g],
                                 transformed_gallery=h_old[g])
    c_oo = top1_correct(old[q], old[g], y[q], y[g], False)
    c_nt = top1_correct(new[q], h_old[g], y[q], y[g], False)
    assert res.scores["recall_at_1"].new_transformed == pytest.approx(c_nt.mean())
    assert res.flips["new_transformed"].flips == int((c_oo & ~c_nt).sum())


def test_transformed_round_trip_and_old_dicts_without_it():
    old, new, _, y = models()
    res = evaluate_compatibility(old, new, y, transformed_gallery=new + 0.1)
    assert CompatibilityResult.from_dict(res.to_dict()).to_dict() == res.to_dict()
    plain = evaluate_compatibility(old, new, y).to_dict()
    assert "new_transformed" not in plain["flips"] and "nfr_new_transformed" not in plain["summary"]
    for scores in plain["scores"].values():
        del scores["new_transformed"]  # a dict written before the field existed
    back = CompatibilityResult.from_dict(plain)
    assert all(s.new_transformed is None for s in back.scores.values())

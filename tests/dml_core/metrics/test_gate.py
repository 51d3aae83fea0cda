import json

import numpy as np
import pytest

from dml_core.metrics import GateDecision, UpdateGate, evaluate_compatibility, update_gate
from tests.dml_core.metrics.test_compatibility import models, top1_correct


@pytest.fixture(scope="module")
def improved():
    old, new, _, y = models()
    return evaluate_compatibility(old, new, y)


def _cond(decision, name):
    return next(c for c in decision.conditions if c.name == name)


def test_allowed_with_defaults(improved):
    d = UpdateGate().decide(improved)
    s = improved.scores["recall_at_1"]
    nfr = improved.flips["new_old"].nfr
    assert nfr <= 0.02  # the data is built so that the improved model is compatible
    assert d.allowed and d.failed == [] and "old gallery index" in d.action
    c = _cond(d, "criterion")
    assert (c.measured, c.threshold, c.margin, c.passed) == (s.new_old, s.old_old, s.new_old - s.old_old, True)
    c = _cond(d, "nfr")
    assert (c.measured, c.threshold, c.passed) == (nfr, 0.02, True) and c.margin == pytest.approx(0.02 - nfr)
    c = _cond(d, "gain")
    assert c.measured == pytest.approx(s.new_old - s.old_old) and c.threshold == 0.0 and c.passed


def test_a_worse_model_is_rejected():
    old, _, rand, y = models()
    d = update_gate(evaluate_compatibility(old, rand, y))
    assert d.rejected and not d.allowed and "nothing is embedded" in d.action
    assert {"improvement", "criterion", "backfill improvement"} <= set(d.failed)
    assert _cond(d, "improvement").setting == "worth serving" and _cond(d, "improvement").margin < 0


def test_model_against_itself_is_not_an_update():
    old, _, _, y = models()
    d = update_gate(evaluate_compatibility(old, old, y))
    # nothing beats what is served: NFR 0 and gain 0 >= 0 pass, every "beats" is strict
    assert d.rejected and d.failed == ["improvement", "criterion", "query model improvement", "backfill improvement"]
    assert _cond(d, "criterion").margin == 0.0


def test_failing_nfr_only_backfills(improved):
    nfr = improved.flips["new_old"].nfr
    s = improved.scores["recall_at_1"]
    assert nfr > 0 and s.new_new > s.old_old
    d = update_gate(improved, max_nfr=nfr / 2)
    assert d.outcome == "backfill" and d.failed == ["nfr"]
    assert _cond(d, "nfr").margin == pytest.approx(-nfr / 2)


def test_failing_gain_only_backfills(improved):
    gain = improved.scores["recall_at_1"].new_old - improved.scores["recall_at_1"].old_old
    d = update_gate(improved, min_gain=gain + 0.01)
    assert d.outcome == "backfill" and d.failed == ["gain"] and _cond(d, "gain").margin == pytest.approx(-0.01)


def test_a_better_incompatible_model_is_backfilled():
    old, new, _, y = models()
    rotated = new @ np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))[0]  # same quality, other space
    compat = evaluate_compatibility(old, rotated, y)
    s = compat.scores["recall_at_1"]
    assert s.new_new > s.old_old > s.new_old
    d = update_gate(compat)
    assert d.outcome == "backfill" and "criterion" in d.failed and _cond(d, "backfill improvement").passed


def test_below_the_floor_is_rejected_whatever_else_passes(improved):
    s = improved.scores["recall_at_1"]
    d = update_gate(improved, floor=s.new_new + 0.01)
    assert d.rejected and d.below_floor and d.failed == ["floor"]
    at_floor = update_gate(improved, floor=s.new_new)  # equal is not below (an identity model equals the floor)
    assert at_floor.allowed and not at_floor.below_floor


def test_first_model_is_backfilled_unless_below_the_floor():
    gate = UpdateGate(metric="map_at_r")
    assert gate.first(0.5, floor=0.4).outcome == "first" and gate.first(0.5).outcome == "first"
    d = gate.first(0.3, floor=0.4)
    assert d.rejected and d.below_floor and _cond(d, "floor").margin == pytest.approx(-0.1)


def test_each_setting_must_beat_what_is_served_by_min_improvement():
    compat = _compat(0.50, 0.51, new_new=0.60)  # query model +0.01, backfill +0.10
    assert update_gate(compat).allowed
    d = update_gate(compat, min_improvement=0.05)
    assert d.outcome == "backfill" and d.failed == ["query model improvement"]
    d = update_gate(compat, min_improvement=0.2)
    assert d.rejected and "improvement" in d.failed


def test_in_a_chain_the_query_model_must_beat_the_served_setting():
    # M(old,old) 0.50, but v2 serves its queries against v1's gallery at 0.55: a v3 at 0.53 against the old
    # gallery beats (old,old) yet would lower what users get
    compat = _compat(0.50, 0.53, new_new=0.60, served=0.55)
    assert compat.scores["recall_at_1"].criterion  # BCT's criterion against (old,old) holds ...
    d = update_gate(compat)
    assert d.served == 0.55 and d.outcome == "backfill"  # ... but the gate reads the served setting
    assert _cond(d, "criterion").threshold == 0.55 and _cond(d, "gain").measured == pytest.approx(-0.02)
    assert update_gate(_compat(0.50, 0.53, new_new=0.54, served=0.55)).rejected


def test_chain_flips_count_against_the_served_query_model():
    old, new, rand, y = models()
    compat = evaluate_compatibility(old, rand, y, served_query=new)
    right_today = top1_correct(new, old, y, y, True)
    wrong_now = ~top1_correct(rand, old, y, y, True)
    assert compat.flips["new_old"].flips == int((right_today & wrong_now).sum())
    assert compat.scores["recall_at_1"].served == pytest.approx(float(right_today.mean()))  # every query valid


def test_json_round_trip(improved):
    d = UpdateGate(metric="map_at_r").decide(improved, floor=0.1)
    s = improved.scores["map_at_r"]
    assert _cond(d, "criterion").measured == s.new_old
    text = d.to_json()
    back = GateDecision.from_dict(json.loads(text))
    assert back == d and json.loads(text)["allowed"] == d.allowed and back.floor == 0.1
    assert all(r.startswith(("PASS", "FAIL")) for r in d.reasons())
    with pytest.raises(ValueError, match="gate metric must be one of"):
        UpdateGate(metric="ndcg")


# ---- issue 10, section 3: threshold comparisons use a 1e-9 tolerance (METHODS 6) ----

def _compat(old_old, new_old, nfr=0.0, queries=100, new_new=None, served=None, new_transformed=None,
            nfr_transformed=0.0):
    from dml_core.metrics import CompatibilityResult, CrossModelScores, NegativeFlips
    new_new = new_old if new_new is None else new_new
    scores = {m: CrossModelScores.build(m, old_old, new_new, new_old, served=served, new_transformed=new_transformed)
              for m in ("recall_at_1", "map_at_r")}
    rates = {"new_old": nfr, "new_new": nfr, **({} if new_transformed is None else {"new_transformed": nfr_transformed})}
    fl = {k: NegativeFlips(k, round(r * queries), queries, queries // 2, r, round(r * queries) / (queries // 2))
          for k, r in rates.items()}
    return CompatibilityResult(mode="cross_leave_one_out", num_queries=queries, scores=scores, flips=fl)


def test_gain_exactly_at_min_gain_passes():
    compat = _compat(28 / 100, 29 / 100)  # 28 -> 29 correct of 100
    assert (29 / 100 - 28 / 100) - 0.01 < 0  # the floating-point margin is negative: the boundary case
    d = update_gate(compat, min_gain=0.01)
    assert d.allowed and d.failed == [] and all(r.startswith("PASS") for r in d.reasons())
    assert _cond(d, "gain").tolerance == 1e-9
    # a real shortfall still fails
    d = update_gate(compat, min_gain=0.01 + 2e-9)
    assert d.failed == ["gain"]


def test_nfr_exactly_at_max_nfr_passes():
    compat = _compat(0.5, 0.6, nfr=10 / 100)
    max_nfr = 0.3 - 0.2  # 0.09999999999999998: equal to 0.1 within the tolerance
    assert 10 / 100 > max_nfr
    d = update_gate(compat, max_nfr=max_nfr)
    assert d.allowed and _cond(d, "nfr").passed
    assert update_gate(compat, max_nfr=0.1 - 2e-9).failed == ["nfr"]


def test_criterion_is_strict_beyond_the_tolerance():
    d = update_gate(_compat(0.5, 0.5 + 1e-12))  # better only by float noise: not an improvement
    assert d.rejected and "criterion" in d.failed and not _cond(d, "criterion").passed
    assert not _compat(0.5, 0.5 + 1e-12).scores["recall_at_1"].criterion
    assert update_gate(_compat(0.5, 0.5 + 1e-6)).allowed


# ---- three settings: query model, transformed gallery h(old), backfill (METHODS 6) ----

TRANSFORMED_CONDITIONS = ["transformed criterion", "transformed nfr", "transformed gain", "transformed improvement"]


def test_the_query_model_comes_before_the_transformed_gallery():
    d = update_gate(_compat(0.50, 0.55, new_new=0.70, new_transformed=0.65))
    assert d.outcome == "query_model" and d.allowed and not d.transformed and d.failed == []
    assert [c.name for c in d.conditions if c.setting == "transformed gallery"] == TRANSFORMED_CONDITIONS
    assert len({c.name for c in d.conditions}) == len(d.conditions)  # every condition has its own name


def test_an_incompatible_query_model_is_served_against_the_transformed_gallery():
    d = update_gate(_compat(0.50, 0.45, new_new=0.70, new_transformed=0.65, nfr=0.3, nfr_transformed=0.01))
    assert d.outcome == "transformed" and d.transformed and not d.allowed and not d.rejected
    assert d.action == "serve new queries against the old gallery transformed by h (no image read)"
    assert d.failed == ["criterion", "nfr", "gain", "query model improvement"]
    c = _cond(d, "transformed criterion")
    assert (c.measured, c.threshold, c.passed) == (0.65, 0.50, True) and c.margin == pytest.approx(0.15)
    assert _cond(d, "transformed nfr").measured == 0.01 and _cond(d, "transformed gain").measured == pytest.approx(0.15)
    back = GateDecision.from_dict(json.loads(d.to_json()))
    assert back == d and back.transformed


def test_each_transformed_condition_that_fails_sends_the_model_to_backfill():
    base = dict(old_old=0.50, new_old=0.45, new_new=0.70, new_transformed=0.65, nfr=0.3)
    for kwargs, gate, failed in (({"nfr_transformed": 0.05}, {}, "transformed nfr"),
                                 ({}, {"min_gain": 0.2}, "transformed gain"),
                                 ({}, {"min_improvement": 0.18}, "transformed improvement"),
                                 ({"new_transformed": 0.49}, {}, "transformed criterion")):
        d = update_gate(_compat(**{**base, **kwargs}), **gate)
        assert d.outcome == "backfill" and failed in d.failed, (failed, d.reasons())
        assert _cond(d, "backfill improvement").passed


def test_the_transformed_gallery_can_be_the_only_setting_worth_serving():
    # neither (new,old) nor (new,new) beats what is served; (new,h(old)) does
    d = update_gate(_compat(0.50, 0.40, new_new=0.48, new_transformed=0.60))
    assert d.outcome == "transformed" and _cond(d, "improvement").measured == pytest.approx(0.10)
    assert "backfill improvement" in d.failed
    assert update_gate(_compat(0.50, 0.40, new_new=0.48)).rejected  # without h: rejected


def test_a_model_worse_in_every_setting_is_rejected_with_a_transformed_gallery():
    d = update_gate(_compat(0.50, 0.40, new_new=0.45, new_transformed=0.48))
    assert d.rejected and {"improvement", "transformed criterion", "backfill improvement"} <= set(d.failed)
    d = update_gate(_compat(0.50, 0.45, new_new=0.70, new_transformed=0.65), floor=0.8)
    assert d.rejected and d.below_floor and d.failed[0] == "floor"


def test_without_a_transformation_no_transformed_condition_is_reported(improved):
    d = UpdateGate().decide(improved)
    assert improved.scores["recall_at_1"].new_transformed is None and "new_transformed" not in improved.flips
    assert not any(c.name.startswith("transformed") or c.setting == "transformed gallery" for c in d.conditions)
    assert "the old or a new gallery" in _cond(d, "improvement").description


def _transformable(seed=0):
    """old: random (no class structure); new: clean classes; h(old): new plus a little noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(20), 10)
    new = 4 * rng.normal(size=(20, 16))[y] + rng.normal(size=(len(y), 16))
    return rng.normal(size=new.shape), new, new + 0.3 * rng.normal(size=new.shape), y


def test_decide_gate_serves_the_transformed_gallery_end_to_end():
    from dml_core.metrics.evaluate import decide_gate

    old, new, h_old, y = _transformable()
    compat, d = decide_gate(new, y, old_z=old, transformed_z=h_old)
    c_oo, c_no, c_nt = (top1_correct(q, g, y, y, True) for q, g in ((old, old), (new, old), (new, h_old)))
    s = compat.scores["recall_at_1"]
    assert (s.old_old, s.new_old, s.new_transformed) == pytest.approx((c_oo.mean(), c_no.mean(), c_nt.mean()))
    assert compat.flips["new_transformed"].flips == int((c_oo & ~c_nt).sum())
    assert c_nt.mean() > 0.9 > 0.2 > c_oo.mean()
    assert d.outcome == "transformed", d.reasons()
    assert not _cond(d, "criterion").passed or not _cond(d, "nfr").passed  # the query model is not compatible
    # the same model without h is backfilled, and h needs the old embeddings it transforms
    assert decide_gate(new, y, old_z=old)[1].outcome == "backfill"
    with pytest.raises(ValueError, match="needs old_z"):
        decide_gate(new, y, transformed_z=h_old)


def test_published_metrics_carry_the_transformed_setting():
    from dml_core.metrics import evaluate_embeddings
    from dml_core.metrics.summary import flat_metrics, summary_row

    old, new, h_old, y = _transformable()
    opis_kwargs = {"max_neg_per_class": 50, "num_calibration_pairs": 2000}
    report = evaluate_embeddings(new, y, old_z=old, transformed_z=h_old, opis_kwargs=opis_kwargs)
    m = flat_metrics(report)
    s, f = report.compatibility.scores["recall_at_1"], report.compatibility.flips["new_transformed"]
    assert m["compatibility"]["recall_at_1"]["new_transformed"] == s.new_transformed
    assert (m["nfr_new_transformed"], m["nfi_new_transformed"]) == (f.nfr, f.nfi)
    row = summary_row("v2", "v2", "v1", m, "recall_at_1")
    assert row["verdict"] == "transformed gallery" and row["m_new_transformed"] == s.new_transformed
    assert row["nfr_new_transformed"] == f.nfr and row["backfill"] is False
    plain = flat_metrics(evaluate_embeddings(new, y, old_z=old, opis_kwargs=opis_kwargs))
    assert plain["compatibility"]["recall_at_1"]["new_transformed"] is None and plain["nfr_new_transformed"] is None
    assert summary_row("v2", "v2", "v1", plain, "recall_at_1")["verdict"] == "backfill"

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

def _compat(old_old, new_old, nfr=0.0, queries=100, new_new=None, served=None):
    from dml_core.metrics import CompatibilityResult, CrossModelScores, NegativeFlips
    new_new = new_old if new_new is None else new_new
    scores = {m: CrossModelScores.build(m, old_old, new_new, new_old, served=served) for m in ("recall_at_1", "map_at_r")}
    flips = round(nfr * queries)
    fl = {k: NegativeFlips(k, flips, queries, queries // 2, nfr, flips / (queries // 2)) for k in ("new_old", "new_new")}
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

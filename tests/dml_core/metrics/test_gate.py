import json

import numpy as np
import pytest

from dml_core.metrics import GateDecision, UpdateGate, evaluate_compatibility, update_gate
from tests.dml_core.metrics.test_compatibility import models


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


def test_failing_criterion():
    old, _, rand, y = models()
    d = update_gate(evaluate_compatibility(old, rand, y))
    assert not d.allowed and "backfill" in d.action
    assert "criterion" in d.failed and _cond(d, "criterion").margin < 0


def test_model_against_itself_is_not_an_update():
    old, _, _, y = models()
    d = update_gate(evaluate_compatibility(old, old, y))
    assert not d.allowed and d.failed == ["criterion"]  # NFR 0 and gain 0 >= 0 pass; criterion is strict
    assert _cond(d, "criterion").margin == 0.0


def test_failing_nfr_only(improved):
    nfr = improved.flips["new_old"].nfr
    assert nfr > 0
    d = update_gate(improved, max_nfr=nfr / 2)
    assert not d.allowed and d.failed == ["nfr"]
    assert _cond(d, "nfr").margin == pytest.approx(-nfr / 2)


def test_failing_gain_only(improved):
    gain = improved.scores["recall_at_1"].new_old - improved.scores["recall_at_1"].old_old
    d = update_gate(improved, min_gain=gain + 0.01)
    assert not d.allowed and d.failed == ["gain"] and _cond(d, "gain").margin == pytest.approx(-0.01)


def test_map_at_r_gate_and_json(improved):
    d = UpdateGate(metric="map_at_r").decide(improved)
    s = improved.scores["map_at_r"]
    assert _cond(d, "criterion").measured == s.new_old
    text = d.to_json()
    back = GateDecision.from_dict(json.loads(text))
    assert back == d and json.loads(text)["allowed"] == d.allowed
    assert all(r.startswith(("PASS", "FAIL")) for r in d.reasons())
    with pytest.raises(ValueError, match="gate metric must be one of"):
        UpdateGate(metric="ndcg")


# ---- issue 10, section 3: threshold comparisons use a 1e-9 tolerance (METHODS 6) ----

def _compat(old_old, new_old, nfr=0.0, queries=100, new_new=None):
    from dml_core.metrics import CompatibilityResult, CrossModelScores, NegativeFlips
    new_new = new_old if new_new is None else new_new
    scores = {m: CrossModelScores.build(m, old_old, new_new, new_old) for m in ("recall_at_1", "map_at_r")}
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
    assert d.failed == ["criterion"] and not d.conditions[0].passed
    assert not _compat(0.5, 0.5 + 1e-12).scores["recall_at_1"].criterion
    assert update_gate(_compat(0.5, 0.5 + 1e-6)).allowed

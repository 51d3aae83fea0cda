"""Update gate (METHODS 6): is the new model worth serving, and if so in which setting, cheapest first?

Worth serving: M(new,new) is not below the raw-pixel floor, and its best reachable setting beats `served`
(the metric of what is served today) by `min_improvement`; otherwise the model is **rejected** and nothing
changes. Then, in order, the first setting whose own metric beats `served` and whose conditions pass:
1. query model against the old gallery: criterion M(new,old) > served, NFR(new,old) <= max_nfr,
   M(new,old) - served >= min_gain;
2. transformed gallery (when a transformation h was trained, METHODS 6.1): the same conditions with h(old) in
   place of the old gallery, each named "transformed ...";
3. full backfill with the new model.
`served` is M(old,old) unless a chain serves another query model against the gallery (then flips and the
criterion count against that setting: `CompatibilityResult` computes them so). With nothing served yet, a
first model above the floor is backfilled.
Each condition is reported with its measured value, threshold, margin (positive = room to spare) and verdict.
A comparison at its threshold uses a tolerance of THRESHOLD_TOLERANCE (1e-9): 29/100 - 28/100 >= 0.01 holds,
and "beats" needs a margin above the tolerance.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dml_core.metrics.compatibility import METRICS, THRESHOLD_TOLERANCE, CompatibilityResult

OUTCOMES = ("first", "query_model", "transformed", "backfill", "rejected")
ACTIONS = {"first": "backfill the gallery with the first model", "query_model": "serve new queries against the "
           "old gallery index", "transformed": "serve new queries against the old gallery transformed by h "
           "(no image read)", "backfill": "backfill the gallery with the new model",
           "rejected": "reject the model: nothing is embedded, indexed or switched"}
WORTH, QUERY_MODEL, TRANSFORMED, BACKFILL = "worth serving", "query model", "transformed gallery", "backfill"


@dataclass
class GateCondition:
    name: str
    measured: float
    threshold: float
    comparison: str  # ">", "<=" or ">=": measured <comparison> threshold must hold
    margin: float
    passed: bool
    description: str
    tolerance: float = THRESHOLD_TOLERANCE  # margins within this of 0 count as on the threshold
    setting: str = QUERY_MODEL  # which step of the gate it belongs to: WORTH, QUERY_MODEL, TRANSFORMED or BACKFILL


def _at_most(name, measured, threshold, setting, description) -> GateCondition:
    margin = threshold - measured
    return GateCondition(name, measured, threshold, "<=", margin, margin >= -THRESHOLD_TOLERANCE, description,
                         setting=setting)


def _at_least(name, measured, threshold, setting, description) -> GateCondition:
    margin = measured - threshold
    return GateCondition(name, measured, threshold, ">=", margin, margin >= -THRESHOLD_TOLERANCE, description,
                         setting=setting)


def _beats(name, score, served, min_improvement, setting, description) -> GateCondition:
    """score - served must exceed 0 (beyond the tolerance) and reach min_improvement (within it)."""
    diff = score - served
    if min_improvement <= 0:
        return GateCondition(name, diff, 0.0, ">", diff, diff > THRESHOLD_TOLERANCE, description, setting=setting)
    cond = _at_least(name, diff, min_improvement, setting, description)
    cond.passed = cond.passed and diff > THRESHOLD_TOLERANCE
    return cond


@dataclass
class GateDecision:
    outcome: str  # one of OUTCOMES
    action: str
    metric: str
    max_nfr: float
    min_gain: float
    min_improvement: float = 0.0
    served: float | None = None  # the metric of what is served today (None: nothing yet)
    floor: float | None = None  # the raw-pixel floor of the metric (None: not measured)
    conditions: list[GateCondition] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        """The new model may query the old gallery without a backfill."""
        return self.outcome == "query_model"

    @property
    def transformed(self) -> bool:
        """The new model may query the old gallery transformed by h (no image read)."""
        return self.outcome == "transformed"

    @property
    def rejected(self) -> bool:
        return self.outcome == "rejected"

    @property
    def below_floor(self) -> bool:
        return any(c.name == "floor" and not c.passed for c in self.conditions)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.conditions if not c.passed]

    def reasons(self) -> list[str]:
        return [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.measured:.6g} {c.comparison} {c.threshold:.6g} "
                f"(margin {c.margin:+.6g}) - {c.description}" for c in self.conditions]

    def to_dict(self) -> dict:
        return {**asdict(self), "allowed": self.allowed}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "GateDecision":
        d = {k: v for k, v in d.items() if k != "allowed"}
        return cls(**{**d, "conditions": [GateCondition(**c) for c in d.get("conditions", [])]})


@dataclass
class UpdateGate:
    max_nfr: float = 0.02
    min_gain: float = 0.0
    metric: str = "recall_at_1"
    min_improvement: float = 0.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"gate metric must be one of {METRICS}, got {self.metric!r}")

    def first(self, new_new: float, floor: float | None = None) -> GateDecision:
        """Nothing is served yet: backfill the first model unless it is below the floor."""
        conds = self._floor(new_new, floor)
        return self._decision("rejected" if any(not c.passed for c in conds) else "first", None, floor, conds)

    def decide(self, compat: CompatibilityResult, floor: float | None = None) -> GateDecision:
        s = compat.scores[self.metric]
        served, m, nt = s.served_score, self.metric, s.new_transformed
        reachable = [s.new_old, s.new_new] + ([] if nt is None else [nt])
        galleries = "the old or a new gallery" if nt is None else "the old, the transformed or a new gallery"
        worth = self._floor(s.new_new, floor) + [
            _beats("improvement", max(reachable), served, self.min_improvement, WORTH,
                   f"the best reachable {m} (new queries against {galleries}) must beat what is served")]
        query = self._against(s, s.new_old, compat.flips["new_old"].nfr, "old", QUERY_MODEL,
                              ("criterion", "nfr", "gain", "query model improvement"))
        transformed = [] if nt is None else self._against(
            s, nt, compat.flips["new_transformed"].nfr, "h(old)", TRANSFORMED,
            tuple(f"transformed {n}" for n in ("criterion", "nfr", "gain", "improvement")))
        backfill = [_beats("backfill improvement", s.new_new, served, self.min_improvement, BACKFILL,
                           f"{m}(new,new) must beat the served {m}")]
        ok = {name: bool(conds) and all(c.passed for c in conds) for name, conds in (
            ("query_model", query), ("transformed", transformed), ("backfill", backfill))}
        outcome = ("rejected" if not all(c.passed for c in worth) else
                   next((name for name, passed in ok.items() if passed), "rejected"))
        return self._decision(outcome, served, floor, worth + query + transformed + backfill)

    def _against(self, s, score, nfr, gallery, setting, names) -> list[GateCondition]:
        """Criterion, NFR, gain and improvement of new queries against `gallery` ("old" or "h(old)")."""
        served, m = s.served_score, self.metric
        criterion, nfr_name, gain, improvement = names
        return [
            GateCondition(criterion, score, served, ">", score - served, score - served > THRESHOLD_TOLERANCE,
                          f"{m}(new,{gallery}) must exceed the served {m} ({s.served_setting})", setting=setting),
            _at_most(nfr_name, nfr, self.max_nfr, setting,
                     f"negative flip rate of new queries against the {gallery} gallery, vs {s.served_setting}"),
            _at_least(gain, score - served, self.min_gain, setting, f"{m}(new,{gallery}) - served {m}"),
            _beats(improvement, score, served, self.min_improvement, setting,
                   f"{m}(new,{gallery}) must beat the served {m}")]

    def _floor(self, new_new: float, floor: float | None) -> list[GateCondition]:
        if floor is None:
            return []
        return [_at_least("floor", new_new, floor, WORTH,
                          f"{self.metric}(new,new) must not be below the raw-pixel floor")]

    def _decision(self, outcome, served, floor, conds) -> GateDecision:
        return GateDecision(outcome, ACTIONS[outcome], self.metric, self.max_nfr, self.min_gain,
                            self.min_improvement, served, floor, conds)


def update_gate(compat: CompatibilityResult, max_nfr: float = 0.02, min_gain: float = 0.0,
                metric: str = "recall_at_1", min_improvement: float = 0.0, floor: float | None = None) -> GateDecision:
    return UpdateGate(max_nfr, min_gain, metric, min_improvement).decide(compat, floor)

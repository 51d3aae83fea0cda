"""Update gate (METHODS 6): may the new model query the old gallery index without a backfill?

Allowed when the compatibility criterion holds, NFR(new,old) <= max_nfr and M(new,old) - M(old,old) >= min_gain.
Each condition is reported with its measured value, threshold, margin (positive = room to spare) and verdict.
A comparison at its threshold uses a tolerance of THRESHOLD_TOLERANCE (1e-9): 29/100 - 28/100 >= 0.01 holds
(margin -4.7e-17 in floating point), and the strict criterion needs a margin above the tolerance.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dml_core.metrics.compatibility import METRICS, THRESHOLD_TOLERANCE, CompatibilityResult

ALLOW_ACTION = "serve new queries against the old gallery index"
BACKFILL_ACTION = "backfill the gallery with the new model"


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


@dataclass
class GateDecision:
    allowed: bool
    action: str
    metric: str
    max_nfr: float
    min_gain: float
    conditions: list[GateCondition] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.conditions if not c.passed]

    def reasons(self) -> list[str]:
        return [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.measured:.6g} {c.comparison} {c.threshold:.6g} "
                f"(margin {c.margin:+.6g}) - {c.description}" for c in self.conditions]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "GateDecision":
        conds = [GateCondition(**c) for c in d.get("conditions", [])]
        return cls(**{**d, "conditions": conds})


@dataclass
class UpdateGate:
    max_nfr: float = 0.02
    min_gain: float = 0.0
    metric: str = "recall_at_1"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"gate metric must be one of {METRICS}, got {self.metric!r}")

    def decide(self, compat: CompatibilityResult) -> GateDecision:
        s = compat.scores[self.metric]
        nfr = compat.flips["new_old"].nfr
        gain = s.new_old - s.old_old
        tol = THRESHOLD_TOLERANCE
        m_crit, m_nfr, m_gain = s.new_old - s.old_old, self.max_nfr - nfr, gain - self.min_gain
        conds = [
            GateCondition("criterion", s.new_old, s.old_old, ">", m_crit, m_crit > tol,
                          f"{self.metric}(new,old) must exceed {self.metric}(old,old)"),
            GateCondition("nfr", nfr, self.max_nfr, "<=", m_nfr, m_nfr >= -tol,
                          "negative flip rate of new queries against the old gallery"),
            GateCondition("gain", gain, self.min_gain, ">=", m_gain, m_gain >= -tol,
                          f"{self.metric}(new,old) - {self.metric}(old,old)"),
        ]
        allowed = all(c.passed for c in conds)
        return GateDecision(allowed, ALLOW_ACTION if allowed else BACKFILL_ACTION, self.metric,
                            self.max_nfr, self.min_gain, conds)


def update_gate(compat: CompatibilityResult, max_nfr: float = 0.02, min_gain: float = 0.0,
                metric: str = "recall_at_1") -> GateDecision:
    return UpdateGate(max_nfr, min_gain, metric).decide(compat)

"""One JSON-serialisable evaluation report: retrieval beside its raw-pixel floor, OPIS, compatibility and the
update gate."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from dml_core.metrics.compatibility import CompatibilityResult
from dml_core.metrics.gate import GateDecision
from dml_core.metrics.opis_result import OpisResult
from dml_core.metrics.retrieval import RetrievalResult

SCHEMA_VERSION = 2  # 2: the floor, and a gate decision for a first model too


@dataclass
class EvaluationReport:
    retrieval: RetrievalResult | None = None
    opis: OpisResult | None = None
    compatibility: CompatibilityResult | None = None
    gate: GateDecision | None = None
    floor: dict | None = None  # the raw-pixel floor of the same split (dml_core.metrics.floor.pixel_floor)
    plots: dict[str, str] = field(default_factory=dict)  # name -> path or URL of a PNG
    meta: dict = field(default_factory=dict)  # free-form: model versions, dataset, run id ...

    def to_dict(self, include_curves: bool = False) -> dict:
        """Plain dict; OPIS curves (classes x thresholds arrays) only when `include_curves`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "retrieval": self.retrieval.to_dict() if self.retrieval else None,
            "opis": self.opis.to_dict(include_curves) if self.opis else None,
            "compatibility": self.compatibility.to_dict() if self.compatibility else None,
            "gate": self.gate.to_dict() if self.gate else None,
            "floor": self.floor,
            "plots": dict(self.plots),
            "meta": dict(self.meta),
        }

    def to_json(self, include_curves: bool = False, **kwargs) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(include_curves), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationReport":
        version = d.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ValueError(f"evaluation report schema_version {version} is newer than this code ({SCHEMA_VERSION})")
        return cls(
            retrieval=RetrievalResult.from_dict(d["retrieval"]) if d.get("retrieval") else None,
            opis=OpisResult.from_dict(d["opis"]) if d.get("opis") else None,
            compatibility=CompatibilityResult.from_dict(d["compatibility"]) if d.get("compatibility") else None,
            gate=GateDecision.from_dict(d["gate"]) if d.get("gate") else None,
            floor=d.get("floor"),
            plots=dict(d.get("plots") or {}),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> "EvaluationReport":
        return cls.from_dict(json.loads(text))

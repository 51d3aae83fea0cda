"""The numbers a retrain publishes: `metrics.json` (flat metrics of an `EvaluationReport`) and the summary
row of one retrain (I13: what `dml run` tabulates and `dml status` lists), from plain data only."""
from __future__ import annotations

import datetime as dt

from dml_core.metrics.report import EvaluationReport

VERDICTS = ("first model", "compatible", "backfill")


def flat_metrics(report: EvaluationReport) -> dict:
    """Recall@K, MAP@R, OPIS, eps-OPIS and, with an old model, the compatibility matrix (M(q,g) per metric),
    update gain, NFR / NFI of new queries against the old gallery, and the gate decision."""
    r, o, c = report.retrieval, report.opis, report.compatibility
    out = {"num_queries": r.num_queries, "recall_at_k": {str(k): v for k, v in sorted(r.recall.items())},
           "map_at_r": r.map_at_r, "opis": o.opis, "eps_opis": o.eps_opis, "eps": o.eps,
           "compatibility": None, "nfr": None, "nfi": None, "gate": None}
    if c is not None:
        out["compatibility"] = {m: {"old_old": s.old_old, "new_new": s.new_new, "new_old": s.new_old,
                                    "criterion": s.criterion, "update_gain": s.update_gain}
                                for m, s in c.scores.items()}
        out["nfr"], out["nfi"] = c.flips["new_old"].nfr, c.flips["new_old"].nfi
    if report.gate is not None:
        out["gate"] = report.gate.to_dict()
    return out


def verdict_of(metrics: dict) -> str:
    """What the gate in `metrics` decides: no gate (no old model) is the gallery's first model."""
    gate = metrics.get("gate")
    return "first model" if gate is None else "compatible" if gate["allowed"] else "backfill"


def summary_row(run: str, model_version: str, gallery_model: str | None, metrics: dict, gate_metric: str,
                verdict: str | None = None, backfill: bool | None = None, reasons: list[str] | None = None) -> dict:
    """One retrain's row: its metrics, M(new,old) and M(old,old) of the gate's metric, NFR, the verdict
    (by default the gate's) and whether the gallery was (or must be) backfilled."""
    verdict = verdict or verdict_of(metrics)
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    scores = (metrics.get("compatibility") or {}).get(gate_metric) or {}
    gate = metrics.get("gate")
    if reasons is None:
        reasons = _reasons(gate) if gate else ["no gallery model yet: the gallery is embedded and indexed"]
    return {"run": run, "model_version": model_version, "gallery_model": gallery_model,
            "recall_at_1": metrics["recall_at_k"].get("1"), "map_at_r": metrics["map_at_r"],
            "opis": metrics["opis"], "eps_opis": metrics["eps_opis"], "m_new_old": scores.get("new_old"),
            "m_old_old": scores.get("old_old"), "nfr": metrics.get("nfr"), "verdict": verdict,
            "backfill": verdict != "compatible" if backfill is None else backfill, "reasons": list(reasons),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _reasons(gate: dict) -> list[str]:
    from dml_core.metrics.gate import GateDecision

    return GateDecision.from_dict(gate).reasons()

"""The numbers a retrain publishes: `metrics.json` (flat metrics of an `EvaluationReport`) and the summary
row of one retrain (I13: what `dml run` tabulates and `dml status` lists), from plain data only."""
from __future__ import annotations

import datetime as dt

from dml_core.metrics.report import EvaluationReport

VERDICTS = ("first model", "compatible", "transformed gallery", "backfill", "rejected")
VERDICT_OF_OUTCOME = {"first": "first model", "query_model": "compatible", "transformed": "transformed gallery",
                      "backfill": "backfill", "rejected": "rejected"}


def flat_metrics(report: EvaluationReport) -> dict:
    """Recall@K, MAP@R, OPIS, eps-OPIS, the raw-pixel floor's Recall@K and MAP@R and, with an old model, the
    compatibility matrix (M(q,g) per metric, M(new,h(old)) with a transformation h, and what is served), update
    gain, NFR / NFI of new queries against the old gallery (and against h(old)), and the gate decision."""
    r, o, c = report.retrieval, report.opis, report.compatibility
    floor = None if report.floor is None else {k: report.floor[k] for k in ("recall_at_k", "map_at_r")}
    out = {"num_queries": r.num_queries, "recall_at_k": {str(k): v for k, v in sorted(r.recall.items())},
           "map_at_r": r.map_at_r, "opis": o.opis, "eps_opis": o.eps_opis, "eps": o.eps, "floor": floor,
           "compatibility": None, "nfr": None, "nfi": None, "nfr_new_transformed": None,
           "nfi_new_transformed": None, "gate": None}
    if c is not None:
        out["compatibility"] = {m: {"old_old": s.old_old, "new_new": s.new_new, "new_old": s.new_old,
                                    "new_transformed": s.new_transformed, "served": s.served_score,
                                    "criterion": s.criterion, "update_gain": s.update_gain}
                                for m, s in c.scores.items()}
        out["nfr"], out["nfi"] = c.flips["new_old"].nfr, c.flips["new_old"].nfi
        if "new_transformed" in c.flips:
            out["nfr_new_transformed"] = c.flips["new_transformed"].nfr
            out["nfi_new_transformed"] = c.flips["new_transformed"].nfi
    if report.gate is not None:
        out["gate"] = report.gate.to_dict()
    return out


def verdict_of(metrics: dict) -> str:
    """What the gate in `metrics` decides (no gate at all: the gallery's first model)."""
    gate = metrics.get("gate")
    return "first model" if gate is None else VERDICT_OF_OUTCOME[gate["outcome"]]


def summary_row(run: str, model_version: str, gallery_model: str | None, metrics: dict, gate_metric: str,
                verdict: str | None = None, backfill: bool | None = None, reasons: list[str] | None = None) -> dict:
    """One retrain's row: its metrics beside the raw-pixel floor's, M(new,new), M(new,old), M(old,old),
    M(new,h(old)) and the served M of the gate's metric, NFR (and of h(old)), the verdict (by default the
    gate's), whether the model is below the floor and whether the gallery was (or must be) backfilled."""
    verdict = verdict or verdict_of(metrics)
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    scores = (metrics.get("compatibility") or {}).get(gate_metric) or {}
    gate, floor = metrics.get("gate"), metrics.get("floor")
    if reasons is None:
        reasons = _reasons(gate) if gate else ["no gallery model yet: the gallery is embedded and indexed"]
    new_new = metrics["map_at_r"] if gate_metric == "map_at_r" else metrics["recall_at_k"].get("1")
    return {"run": run, "model_version": model_version, "gallery_model": gallery_model,
            "recall_at_1": metrics["recall_at_k"].get("1"), "map_at_r": metrics["map_at_r"],
            "floor_recall_at_1": floor["recall_at_k"].get("1") if floor else None,
            "floor_map_at_r": floor["map_at_r"] if floor else None,
            "below_floor": bool(gate) and any(c["name"] == "floor" and not c["passed"] for c in gate["conditions"]),
            "opis": metrics["opis"], "eps_opis": metrics["eps_opis"], "gate_metric": gate_metric,
            "m_new_new": new_new, "m_new_old": scores.get("new_old"), "m_old_old": scores.get("old_old"),
            "m_new_transformed": scores.get("new_transformed"), "served": scores.get("served"),
            "nfr": metrics.get("nfr"), "nfr_new_transformed": metrics.get("nfr_new_transformed"), "verdict": verdict,
            "backfill": verdict in ("first model", "backfill") if backfill is None else backfill,
            "reasons": list(reasons),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _reasons(gate: dict) -> list[str]:
    from dml_core.metrics.gate import GateDecision

    return GateDecision.from_dict(gate).reasons()

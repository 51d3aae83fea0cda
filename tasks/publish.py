"""Publishing a retrain: its summary row (`summary.json` beside the evaluation) and the Prefect artifacts:
a table of the metrics, a markdown note of the gate decision with its reasons, a link to the utility plot."""
from __future__ import annotations

import re

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dml_core import storage
from dml_core.metrics.summary import summary_row
from tasks.evaluate import write_json


def artifact_key(run: str, what: str) -> str:
    """Prefect artifact keys hold lowercase letters, digits and dashes only."""
    return f"{re.sub(r'[^a-z0-9]+', '-', run.lower()).strip('-')}-{what}"


def metric_rows(metrics: dict) -> list[dict]:
    """The metrics table: Recall@K, MAP@R (each beside the raw-pixel floor's), OPIS, eps-OPIS, the compatibility
    matrix, update gain, NFR/NFI."""
    floor = metrics.get("floor") or {"recall_at_k": {}}
    rows = [{"metric": f"Recall@{k}", "value": v, "floor": floor["recall_at_k"].get(k)}
            for k, v in metrics["recall_at_k"].items()]
    rows += [{"metric": "MAP@R", "value": metrics["map_at_r"], "floor": floor.get("map_at_r")},
             {"metric": "OPIS", "value": metrics["opis"]},
             {"metric": f"{metrics['eps']:g}-OPIS", "value": metrics["eps_opis"]}]
    for name, s in (metrics.get("compatibility") or {}).items():
        rows += [{"metric": f"{name} M({q},{g})", "value": s[f"{q}_{g}"]}
                 for q, g in (("old", "old"), ("new", "new"), ("new", "old"))]
        rows.append({"metric": f"{name} update gain", "value": s["update_gain"]})
    if metrics.get("nfr") is not None:
        rows += [{"metric": "NFR (new,old)", "value": metrics["nfr"]},
                 {"metric": "NFI (new,old)", "value": metrics["nfi"]}]
    rounded = lambda v: "n/a" if v is None else round(float(v), 6)  # noqa: E731
    return [{"metric": r["metric"], "value": rounded(r["value"]), "floor": rounded(r.get("floor"))} for r in rows]


def gate_markdown(row: dict) -> str:
    old = row["gallery_model"] or "none (first model of the gallery)"
    lines = [f"# Update gate: {row['run']}", "", f"- model: `{row['model_version']}`", f"- gallery model: `{old}`",
             f"- verdict: **{row['verdict']}**" + (" (below the raw-pixel floor)" if row.get("below_floor") else ""),
             f"- backfill: **{'yes' if row['backfill'] else 'no'}**", "",
             "## Reasons", ""]
    return "\n".join(lines + [f"- {r}" for r in row["reasons"]]) + "\n"


def plot_link(url: str) -> str:
    return "file://" + storage.local_path(url) if storage.is_local(url) else url


def publish(evaluation: dict, gate_metric: str, verdict: str, backfill: bool, reasons: list[str],
            gallery_model: str | None = None) -> dict:
    """Write the final summary row to the evaluation's `summary.json` and publish the artifacts; returns the row.
    `gallery_model`: the one the gate compared with, when not the evaluation's (gated again at the update)."""
    m = evaluation["metrics"]
    row = summary_row(m["run"], m["model_version"], gallery_model or m["gallery_model"], m, gate_metric, verdict,
                      backfill, reasons)
    write_json(evaluation["files"]["summary"], row)
    run = row["run"]
    create_table_artifact(metric_rows(m), key=artifact_key(run, "metrics"),
                          description=f"Evaluation of {row['model_version']} on {m['dataset']['name']} "
                                      f"{m['dataset']['version']} (eval split, {m['num_queries']} queries)")
    create_markdown_artifact(gate_markdown(row), key=artifact_key(run, "gate"),
                             description=f"Update gate decision of {run}: {row['verdict']}")
    create_link_artifact(plot_link(evaluation["files"]["plot"]), link_text=f"utility curves of {run}",
                         key=artifact_key(run, "utility-plot"), description="OPIS utility-vs-threshold plot")
    return row

"""`dml status CONFIG`: what serves now (the registry, per gallery) and the last retrain runs with their gate
verdicts and their Recall@1 / MAP@R beside the raw-pixel floor's (each run's
`<run.root>/runs/<run>/evaluation/summary.json`, newest first), as rich tables."""
from __future__ import annotations

import json

from rich.table import Table

from dml_core import storage
from dml_core.config import load_config, parse_overrides
from dml_core.gallery.registry import Registry

SUMMARY = ("evaluation", "summary.json")


def status_tables(config: str, overrides: list[str] | None = None, limit: int = 20) -> list[Table]:
    """The registry table and the table of the `limit` most recent runs."""
    cfg = load_config(config, parse_overrides(overrides))
    storage.configure(cfg.storage)
    return [registry_table(cfg.run.root), runs_table(cfg.run.root, limit)]


def registry_table(root: str) -> Table:
    registry = Registry(root)
    table = Table(title=f"Registry ({registry.url})")
    for column in ("gallery", "gallery model", "query model", "transformed by", "re-embedded", "index", "updated"):
        table.add_column(column)
    updated = {h["gallery"]: h["time"] for h in registry.history()}  # oldest first: the last one wins
    galleries = registry.galleries()
    for name, entry in sorted(galleries.items()):
        h = entry.transformation
        share = "all" if h is None else f"{entry.reembedded or 0:.0%}"  # a transformed gallery: the share re-embedded
        table.add_row(name, entry.gallery_model.version, entry.query_model.version, "-" if h is None else h.version,
                      share, entry.index, updated.get(name, "-"))
    if not galleries:
        table.caption = "no gallery has a model yet: the first retrain run backfills one"
    return table


def last_runs(root: str) -> list[dict]:
    """Every run's summary row, newest first; an unreadable summary is a row saying so (and where)."""
    rows = []
    runs = storage.join(root, "runs")
    for name in storage.list_names(runs):
        url = storage.join(runs, name, *SUMMARY)
        if not storage.exists(url):
            continue  # a run that has not finished (or only trained)
        try:
            row = json.loads(storage.read_bytes(url))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            row = {"run": name, "verdict": f"unreadable {url}: {e}"}
        rows.append(row)
    return sorted(rows, key=lambda r: str(r.get("finished_at") or ""), reverse=True)


def runs_table(root: str, limit: int = 20) -> Table:
    rows = last_runs(root)
    table = Table(title=f"Last runs ({storage.join(root, 'runs')})")
    for column, justify in (("run", "left"), ("verdict", "left"), ("backfill", "left"), ("Recall@1", "right"),
                            ("floor R@1", "right"), ("MAP@R", "right"), ("floor MAP@R", "right"), ("NFR", "right"),
                            ("finished", "left")):
        table.add_column(column, justify=justify)
    for row in rows[:limit]:
        backfill = row.get("backfill")
        verdict = str(row.get("verdict") or "-") + (" (below floor)" if row.get("below_floor") else "")
        table.add_row(str(row.get("run", "?")), verdict, "-" if backfill is None else ("yes" if backfill else "no"),
                      *(_number(row.get(k)) for k in ("recall_at_1", "floor_recall_at_1", "map_at_r",
                                                       "floor_map_at_r", "nfr")),
                      str(row.get("finished_at") or "-"))
    if not rows:
        table.caption = "no finished retrain run yet"
    elif len(rows) > limit:
        table.caption = f"the {limit} newest of {len(rows)} runs"
    return table


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value or "-")

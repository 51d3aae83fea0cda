"""`status_tables`: the registry as the library wrote it, and the last runs from their summary.json files,
newest first, with an unreadable summary shown as such (naming the file) instead of failing the command."""
from __future__ import annotations

import json

from rich.console import Console

from dml_core.gallery.registry import ModelRef, Registry
from flows.status import status_tables


def _render(table) -> list[str]:
    console = Console(width=250, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _row(lines: list[str], first_cell: str) -> list[str]:
    """The cells of the row whose first cell is `first_cell`."""
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n" + "\n".join(lines))


def _summary(root, run: str, **row) -> None:
    path = root / "runs" / run / "evaluation"
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"run": run, **row}))


def test_status_shows_the_registry_and_the_runs_newest_first(tmp_path):
    root = tmp_path / "root"
    registry = Registry(str(root))
    ref = {v: ModelRef(v, f"{root}/runs/{v}/checkpoints/checkpoint_00000040") for v in ("v1", "v2", "w1", "w2", "h")}
    registry.switch("fmnist", ref["v1"], f"{root}/galleries/fmnist/v1/manifest.json",
                    f"{root}/indexes/fmnist/v1/manifest.json", "first model")
    registry.switch("other", ref["w1"], f"{root}/galleries/other/w1/manifest.json",
                    f"{root}/indexes/other/w1/manifest.json", "first model")
    registry.set_query_model("fmnist", ref["v2"], "compatible")
    registry.transformed("other", ref["w2"], ref["h"], f"{root}/galleries/other/w2-transformed/manifest.json",
                         f"{root}/galleries/other/w2-transformed/index.json", "transformed")
    registry.reembedded_step("other", f"{root}/galleries/other/w2-transformed/index-step-000003.json", 0.3, "step 3")
    _summary(root, "v2", verdict="compatible", backfill=False, recall_at_1=0.8125, nfr=0.0312,
             finished_at="2026-01-02T11:00:00+00:00")
    _summary(root, "v1", verdict="first model", backfill=True, recall_at_1=0.75, nfr=None,
             finished_at="2026-01-02T10:00:00+00:00")
    _summary(root, "v3", verdict="rejected", below_floor=True, backfill=False, recall_at_1=0.5, nfr=0.25,
             floor_recall_at_1=0.6, map_at_r=0.2, floor_map_at_r=0.3, finished_at="2026-01-02T12:00:00+00:00")
    (root / "runs" / "trained-only" / "checkpoints").mkdir(parents=True)  # no summary: not listed
    (root / "runs" / "broken" / "evaluation").mkdir(parents=True)
    (root / "runs" / "broken" / "evaluation" / "summary.json").write_text("{not json")
    config = tmp_path / "c.yaml"
    config.write_text("run: {name: ignored, root: ./elsewhere}\n")

    reg_table, runs_table = status_tables(str(config), [f"run.root={root}"])

    reg = _render(reg_table)
    updated = [h["time"] for h in registry.history("fmnist")][-1]
    assert _row(reg, "fmnist") == ["fmnist", "v1", "v2", "-", "all", f"{root}/indexes/fmnist/v1/manifest.json",
                                   updated]
    assert _row(reg, "other")[1:5] == ["w1", "w2", "h", "30%"]  # a transformed gallery, 30% re-embedded by w2
    runs = _render(runs_table)
    assert _row(runs, "v3") == ["v3", "rejected (below floor)", "no", "0.500", "0.600", "0.200", "0.300", "0.250",
                                "2026-01-02T12:00:00+00:00"]
    assert _row(runs, "v2") == ["v2", "compatible", "no", "0.812", "-", "-", "-", "0.031", "2026-01-02T11:00:00+00:00"]
    assert _row(runs, "v1")[1:5] == ["first model", "yes", "0.750", "-"]
    order = [c for c in (line.split("│")[1].strip() for line in runs if line.count("│") > 5) if c]
    assert order == ["v3", "v2", "v1", "broken"]  # newest first; a summary with no time last
    assert f"unreadable {root}/runs/broken/evaluation/summary.json" in " ".join(runs)
    assert "trained-only" not in " ".join(runs)


def test_status_of_an_empty_root_says_what_comes_next(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{name: x, root: {tmp_path / 'root'}}}\n")
    reg, runs = (" ".join(_render(t)) for t in status_tables(str(config)))
    assert "no gallery has a model yet" in reg and "no finished retrain run yet" in runs

"""The summary of a story of runs (`dml run`): the raw-pixel floor, then one row per run from its summary row
(the retrain flow's result, `<run>/evaluation/summary.json`), as a rich table for the console and as markdown
for `demo_summary.md`. M is the gate's metric; a model below the floor says so in its verdict."""
from __future__ import annotations

SUMMARY_FILE = "demo_summary.md"
HEADERS = ("run", "Recall@1", "MAP@R", "OPIS", "eps-OPIS", "M(new,new)", "M(new,old)", "M(old,old)", "NFR",
           "verdict", "backfill")
FLOOR_RUN = "floor (raw pixels)"


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def summary_cells(row: dict) -> list[str]:
    """The table cells of one summary row; metrics that do not apply (None) show as "-"."""
    verdict = str(row.get("verdict", "?")) + (" (below floor)" if row.get("below_floor") else "")
    return [str(row.get("run", "?")), *(_number(row.get(k)) for k in (
        "recall_at_1", "map_at_r", "opis", "eps_opis", "m_new_new", "m_new_old", "m_old_old", "nfr")),
        verdict, "-" if row.get("backfill") is None else "yes" if row["backfill"] else "no"]


def floor_rows(rows: list[dict]) -> list[dict]:
    """One row per distinct raw-pixel floor of the runs (one, when they share the split and input size)."""
    floors = dict.fromkeys((r.get("floor_recall_at_1"), r.get("floor_map_at_r")) for r in rows)
    return [{"run": FLOOR_RUN, "recall_at_1": r1, "map_at_r": m, "verdict": "-"}
            for r1, m in floors if r1 is not None or m is not None]


def summary_table(rows: list[dict], title: str = "runs"):
    """A rich Table of the floor and the rows, in the order given."""
    from rich.table import Table

    table = Table(title=title)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="right" if 0 < i < len(HEADERS) - 2 else "left")
    for row in floor_rows(rows) + rows:
        table.add_row(*summary_cells(row))
    return table


def summary_markdown(rows: list[dict]) -> str:
    """The floor and the rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in summary_cells(row)) + " |"
              for row in floor_rows(rows) + rows]
    return "\n".join(lines) + "\n"

"""The summary of a story of runs (`dml run`): one row per run from its summary row (the retrain flow's result,
`<run>/evaluation/summary.json`), as a rich table for the console and as markdown for `demo_summary.md`."""
from __future__ import annotations

SUMMARY_FILE = "demo_summary.md"
HEADERS = ("run", "Recall@1", "MAP@R", "OPIS", "eps-OPIS", "M(new,old) vs M(old,old)", "NFR", "verdict",
           "backfill")


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def summary_cells(row: dict) -> list[str]:
    """The table cells of one summary row; metrics that do not apply (None) show as "-"."""
    m_new_old, m_old_old = row.get("m_new_old"), row.get("m_old_old")
    compat = "-" if m_new_old is None and m_old_old is None else f"{_number(m_new_old)} vs {_number(m_old_old)}"
    return [str(row.get("run", "?")), _number(row.get("recall_at_1")), _number(row.get("map_at_r")),
            _number(row.get("opis")), _number(row.get("eps_opis")), compat, _number(row.get("nfr")),
            str(row.get("verdict", "?")), "yes" if row.get("backfill") else "no"]


def summary_table(rows: list[dict], title: str = "runs"):
    """A rich Table of the rows, in the order given."""
    from rich.table import Table

    table = Table(title=title)
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="right" if 0 < i < 7 else "left")
    for row in rows:
        table.add_row(*summary_cells(row))
    return table


def summary_markdown(rows: list[dict]) -> str:
    """The rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in summary_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"

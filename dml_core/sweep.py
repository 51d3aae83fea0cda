"""A sweep as data: the grid of `--grid key=v1,v2` items times seeds, each trial's name and overrides, and the
table of the trials' evaluation reports (per trial, and mean / standard deviation over seeds).

Pure: no Ray. `tasks/sweep.py` runs the trials; everything a resumed sweep needs is on storage under these
names (a trial is finished when its report exists).
"""
from __future__ import annotations

import itertools
import json
import re
import statistics
from dataclasses import dataclass, field

from dml_core.config import ConfigError, parse_overrides

SWEEPS = "sweeps"  # <run.root>/sweeps/<sweep name>/
REPORT_FILE = "sweep_report.json"  # <run dir>/sweep_report.json: the trial's evaluation report
TABLE_JSON, TABLE_MD = "trials.json", "trials.md"
SEED_KEY = "train.seed"
METRICS = (("Recall@1", "recall_at_1"), ("floor R@1", "floor_recall_at_1"), ("Recall@5", "recall_at_5"),
           ("MAP@R", "map_at_r"), ("floor MAP@R", "floor_map_at_r"), ("OPIS", "opis"), ("eps-OPIS", "eps_opis"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Trial:
    """One training run of the sweep: its grid point, its seed and the name part that tells it apart."""

    key: str  # e.g. "tau0.1-seed0"; the run is `<run.name>-<key>`
    values: dict = field(default_factory=dict)  # dotted grid key -> value (YAML-read)
    seed: int = 0

    def overrides(self, run_name: str) -> list[str]:
        """`--set` items of this trial: its grid values, its seed and its own run name."""
        items = [f"{k}={json.dumps(v)}" for k, v in self.values.items()]
        return [*items, f"{SEED_KEY}={self.seed}", f"run.name={run_name}-{self.key}"]


def split_values(text: str) -> list[str]:
    """`a,[1,2],{x: 1}` -> ["a", "[1,2]", "{x: 1}"]: commas inside brackets or braces do not split."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return [v.strip() for v in out + [text[start:]]]


def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """`["loss.tau=0.05,0.1"]` -> {"loss.tau": [0.05, 0.1]}, each value read as YAML as `--set` reads it."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not text.strip():
            raise ConfigError(f"--grid {item!r}: expected key.path=v1,v2,..., e.g. loss.tau=0.05,0.1")
        if key in grid:
            raise ConfigError(f"--grid {item!r}: {key} is given twice; list all its values in one --grid")
        if key == SEED_KEY:
            raise ConfigError(f"--grid {item!r}: seeds come from --seeds (train.seed = config's seed + 0..n-1)")
        values = []
        for text_value in split_values(text):
            node = parse_overrides([f"{key}={text_value}"])
            for part in key.split("."):
                node = node[part]
            values.append(node)
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        grid[key] = values
    return grid


def expand_grid(grid: dict[str, list], seeds: int = 1, first_seed: int = 0) -> list[Trial]:
    """The cartesian product of the grid's values (keys in the order given), each with seeds `first_seed`,
    `first_seed + 1`, ...; trial keys are unique names safe for storage paths."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    labels = _key_labels(list(grid))
    trials = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        for seed in range(first_seed, first_seed + seeds):
            parts = [f"{labels[k]}{_slug(v)}" for k, v in values.items()] + [f"seed{seed}"]
            trials.append(Trial(key="-".join(parts), values=values, seed=seed))
    keys = [t.key for t in trials]
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ConfigError(f"--grid values give equal trial names {clashes}; use values that differ in "
                          "letters, digits, '.', '_' or '-'")
    return trials


def _key_labels(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (`loss.tau` -> `tau`), or the whole key where last parts repeat."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def _slug(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return _UNSAFE.sub("_", text).strip("_") or "_"


def trial_row(trial: Trial, run: str, report: dict) -> dict:
    """The table row of one finished trial from its evaluation report (`EvaluationReport.to_dict()`), with the
    raw-pixel floor of the same split beside its Recall@1 and MAP@R."""
    floor = report.get("floor") or {}
    metrics = {**(report.get("retrieval") or {}), **(report.get("opis") or {}),
               "floor_recall_at_1": (floor.get("recall_at_k") or {}).get("1"), "floor_map_at_r": floor.get("map_at_r")}
    row = {"trial": trial.key, "run": run, "seed": trial.seed, "values": dict(trial.values)}
    row.update({name: metrics.get(name) for _, name in METRICS})
    row["checkpoint"] = (report.get("meta") or {}).get("checkpoint")
    return row


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation of each metric over the seeds of each grid point, in grid order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["values"], sort_keys=True), []).append(row)
    out = []
    for members in groups.values():
        item = {"values": members[0]["values"], "seeds": [r["seed"] for r in members]}
        for _, name in METRICS:
            xs = [r[name] for r in members if r.get(name) is not None]
            item[name] = {"mean": statistics.fmean(xs) if xs else None,
                          "std": statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)}
        out.append(item)
    return out


def table_json(name: str, rows: list[dict]) -> str:
    return json.dumps({"sweep": name, "trials": rows, "aggregate": aggregate(rows)}, indent=2)


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _values_text(values: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "-"


def trial_cells(row: dict) -> list[str]:
    return [row["trial"], str(row["seed"])] + [_number(row.get(name)) for _, name in METRICS]


def aggregate_cells(item: dict) -> list[str]:
    cells = [_values_text(item["values"]), str(len(item["seeds"]))]
    for _, name in METRICS:
        m = item[name]
        cells.append("-" if m["mean"] is None else f"{m['mean']:.4f} ± {m['std']:.4f}")
    return cells


TRIAL_HEADERS = ("trial", "seed", *(h for h, _ in METRICS))
AGGREGATE_HEADERS = ("grid point", "seeds", *(h for h, _ in METRICS))


def table_markdown(name: str, rows: list[dict]) -> str:
    """The trials, then mean ± standard deviation over seeds per grid point, as markdown."""
    def table(headers, lines):
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return out + ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in lines]

    text = [f"# Sweep {name}", "", "## Trials", ""] + table(TRIAL_HEADERS, map(trial_cells, rows))
    text += ["", "## Mean ± standard deviation over seeds", ""]
    text += table(AGGREGATE_HEADERS, map(aggregate_cells, aggregate(rows)))
    return "\n".join(text) + "\n"

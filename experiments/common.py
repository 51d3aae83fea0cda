"""What every experiment shares: where runs and results go, the `dml` command, tiny settings for the tests,
and mean / standard deviation over seeds."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

from dml_core import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")


@dataclass
class Context:
    """One invocation of the runner: the storage root of every run, the results folder, seeds, tiny mode."""

    root: str  # run.root of every run (local folder or s3://)
    out: str  # results folder: <name>.json, <name>.md and plots
    seeds: int = 3
    tiny: bool = False  # a few steps on little data: the tests' way to keep each experiment working
    log: list = field(default_factory=list)  # the dml commands run, as typed

    def config(self, name: str) -> str:
        return os.path.join(CONFIGS, name)

    def dml(self, *args: str, env: dict | None = None) -> None:
        """Run `dml ARGS... --set run.root=<root>` as a user would; raise if it fails. In this process (one Ray
        and one Prefect API for all the commands, see `run.main`), or in a process of its own with `env`."""
        cmd = [*args, "--set", f"run.root={self.root}"]
        self.log.append("dml " + " ".join(_quote(a) for a in cmd))
        print(f"\n$ {self.log[-1]}", flush=True)
        if env is not None:
            subprocess.run([sys.executable, "-m", "flows.cli", *cmd], cwd=REPO, env=env, check=True)
            return
        from flows.cli import app

        try:
            code = app(cmd, standalone_mode=False)
        except SystemExit as e:
            code = e.code
        if code:
            raise RuntimeError(f"failed (exit code {code}): {self.log[-1]}")

    def write(self, name: str, result: dict, markdown: str) -> dict:
        """`<out>/<name>.json` (the commands included) and `<out>/<name>.md`."""
        os.makedirs(self.out, exist_ok=True)
        result = {"experiment": name, "tiny": self.tiny, "seeds": self.seeds, "commands": list(self.log), **result}
        with open(os.path.join(self.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(self.out, f"{name}.md"), "w") as f:
            f.write(markdown)
        return result

    def path(self, filename: str) -> str:
        os.makedirs(self.out, exist_ok=True)
        return os.path.join(self.out, filename)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}[],*") else arg


def read_json(url: str) -> dict:
    return json.loads(storage.read_bytes(url))


def run_dir(ctx: Context, run: str) -> str:
    return storage.join(ctx.root, "runs", run)


def mean_std(xs) -> dict:
    xs = [float(x) for x in xs if x is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None), "n": len(xs)}


def cell(ms: dict, digits: int = 4) -> str:
    """mean ± std; a single value (n = 1) has no spread to show, so it reads "value (n=1)", never "± 0"."""
    if ms["mean"] is None:
        return "-"
    if ms.get("n") == 1:
        return f"{ms['mean']:.{digits}f} (n=1)"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def sweep(ctx: Context, config: str, name: str, grid: list[str], sets: list[str] = ()) -> list[dict]:
    """`dml shard`, then `dml sweep` of `config` over `grid` with the context's seeds; the trials' rows (`dml_core.sweep`), each
    with its full evaluation report (OPIS curves included) and its training metrics."""
    from dml_core.training.metrics_log import read_metrics

    sets = [a for item in sets for a in ("--set", item)]
    ctx.dml("shard", ctx.config(config), *sets)
    ctx.dml("sweep", ctx.config(config), "--name", name, "--seeds", str(ctx.seeds),
            *(a for item in grid for a in ("--grid", item)), *sets)
    rows = read_json(storage.join(ctx.root, "sweeps", name, "trials.json"))["trials"]
    for row in rows:
        row["report"] = read_json(storage.join(run_dir(ctx, row["run"]), "sweep_report.json"))
        row["metrics"] = read_metrics(storage.join(run_dir(ctx, row["run"]), "metrics.jsonl"))
    return rows

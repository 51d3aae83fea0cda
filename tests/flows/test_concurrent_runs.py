"""Two `dml run` with different run names on one fresh root at the same time (each holds only its own run's
lease): the registry ends with one gated history. Before, both reported "first model", both backfilled, and
the later replaced the earlier with no gate between them."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.flows._cli_helpers import dml_command
from tests.flows._flow_helpers import DATASET, write_config

pytestmark = pytest.mark.slow


def test_two_runs_on_one_root_end_with_one_gated_history(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    from dml_core.gallery.registry import Registry

    config = write_config(str(tmp_path))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    runs = {name: subprocess.Popen(dml_command() + ["run", config, "--set", f"run.name={name}"], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in ("ra", "rb")}
    logs = {name: proc.communicate(timeout=900)[0] for name, proc in runs.items()}
    assert all(proc.returncode == 0 for proc in runs.values()), {n: log[-3000:] for n, log in logs.items()}

    rows = {name: json.loads((tmp_path / "storage" / "runs" / name / "evaluation" / "summary.json").read_text())
            for name in runs}
    (first,) = [name for name, row in rows.items() if row["verdict"] == "first model"]
    (second,) = set(runs) - {first}
    # the second was gated against the first's model, at its evaluation or (when the first registered while the
    # second was evaluated against nothing) again at its update
    assert rows[second]["gallery_model"] == first, rows[second]
    history = Registry(str(tmp_path / "storage")).history(DATASET)
    assert history[0]["entry"]["gallery_model"]["version"] == first
    served = {"backfill": (second, second), "compatible": (first, second), "rejected": (first, first)}
    entry = history[-1]["entry"]
    assert (entry["gallery_model"]["version"], entry["query_model"]["version"]) == served[rows[second]["verdict"]]
    assert len(history) == (1 if rows[second]["verdict"] == "rejected" else 2), history
    regated = "gated again" in logs[second]
    assert regated == any("gated again" in r for r in rows[second]["reasons"])
    print(f"{second} was {'gated again at its update' if regated else 'evaluated against ' + first}")

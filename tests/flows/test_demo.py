"""The demo as the README runs it (`bash scripts/demo.sh`: its set-up, then `dml run configs/demo.yaml`), on
tiny settings: the three-run story runs through the real command and flows and writes the summary the README
shows. The set-up finds everything installed (this test's own virtual environment), so it only checks it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.flows._cli_helpers import REPO

pytestmark = pytest.mark.slow
TINY = ["data.source={kind: fashion_mnist, subsets: [train], max_per_class: 40}", "train.steps=4",
        "train.checkpoint_every=4", "data.eval_batch_size=64"]


def test_the_demo_config_runs_its_story_end_to_end(tmp_path):
    root = tmp_path / "storage"
    sets = [a for item in [*TINY, f"run.root={root}"] for a in ("--set", item)]
    venv = os.path.dirname(os.path.dirname(sys.executable))
    done = subprocess.run(["bash", f"{REPO}/scripts/demo.sh", *sets], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VENV": venv})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((root / "runs" / v / "evaluation" / "summary.json").read_text()) for v in ("v1", "v2", "v3")]
    assert [r["run"] for r in rows] == ["v1", "v2", "v3"] and rows[0]["verdict"] == "first model"
    registry = json.loads((root / "registry.json").read_text())
    (entry,) = registry["galleries"].values()
    backfilled = {r["run"] for r in rows if r["backfill"]}
    assert entry["gallery_model"]["version"] == max(backfilled)  # the last backfill is the gallery model
    assert entry["query_model"]["version"] == "v3"
    summary = (root / "demo_summary.md").read_text().splitlines()
    assert len(summary) == 2 + 3 and all(f"| {v} |" in line for v, line in zip(("v1", "v2", "v3"), summary[2:]))

"""The demo as the README runs it (`bash scripts/demo.sh`: its set-up, then `dml run configs/demo.yaml`), on
tiny settings: the four-run story runs through the real command and flows and writes the summary the README
shows, the raw-pixel floor's row first. The set-up finds everything installed (this test's own virtual
environment), so it only checks it. With so few steps the verdicts after v1 are not the demo's; whatever they
are, the gate never serves a model below the floor and the registry serves the last model it accepted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.flows._cli_helpers import REPO

pytestmark = pytest.mark.slow
# 100 classes: 70 training classes, as many as v1's data.train_classes. 60 steps: v1 is above the floor, so it
# is served and the runs after it (BCT against the gallery model) have one
TINY = ["data.source={kind: font_glyphs, variant: many, image_size: 16, max_classes: 100}", "model.image_size=16",
        "train.steps=60", "train.checkpoint_every=60", "data.eval_batch_size=256"]
RUNS = ("v1", "v2", "v3", "v4")


def test_the_demo_config_runs_its_story_end_to_end(tmp_path):
    root = tmp_path / "storage"
    sets = [a for item in [*TINY, f"run.root={root}"] for a in ("--set", item)]
    venv = os.path.dirname(os.path.dirname(sys.executable))
    done = subprocess.run(["bash", f"{REPO}/scripts/demo.sh", *sets], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VENV": venv})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((root / "runs" / v / "evaluation" / "summary.json").read_text()) for v in RUNS]
    assert [r["run"] for r in rows] == list(RUNS)
    for r in rows:
        assert r["floor_map_at_r"] is not None and r["below_floor"] == (r["m_new_new"] < r["floor_map_at_r"])
        assert not (r["below_floor"] and r["verdict"] != "rejected"), r
    assert rows[0]["verdict"] == "first model"
    served = [r["run"] for r in rows if r["verdict"] != "rejected"]
    (entry,) = json.loads((root / "registry.json").read_text())["galleries"].values()
    assert entry["query_model"]["version"] == served[-1]
    summary = (root / "demo_summary.md").read_text().splitlines()
    assert summary[2].startswith("| floor (raw pixels) |") and len(summary) == 3 + len(RUNS)
    assert all(f"| {v} |" in line for v, line in zip(RUNS, summary[3:]))

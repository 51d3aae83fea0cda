"""`dml sweep` on Ray Tune driving the Ray Train trainer, on tiny Fashion-MNIST shards: a two-trial sweep writes
each trial's report and the table, whose numbers a recomputation from each checkpoint reproduces; a sweep
whose driver is SIGKILLed after its first trial is started again and does not rerun that trial."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dml_core import storage
from dml_core.metrics.evaluate import evaluate_embeddings
from dml_core.metrics.floor import pixel_floor
from dml_core.sweep import REPORT_FILE, SWEEPS, TABLE_JSON, TABLE_MD
from dml_core.training.embed import embed_split
from tasks.train import newest_checkpoint_url
from tests.tasks._train_helpers import REPO, small_config

pytestmark = pytest.mark.slow
GRID = ["loss.tau=0.1,0.2"]


def _config_file(tmp_path, shards, name: str) -> str:
    cfg = small_config(str(tmp_path / "root"), shards, name, steps=4, train={"log_every": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


def _table(root: str, name: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(root, SWEEPS, name, TABLE_JSON)))


def test_two_trial_sweep_writes_reports_and_a_table_that_recomputation_reproduces(tmp_path, fmnist_shards):
    from tasks.sweep import run_sweep

    config = _config_file(tmp_path, fmnist_shards, "sw")
    result = run_sweep(config, GRID, seeds=1)
    assert result.ran == ["tau0.1-seed0", "tau0.2-seed0"] and result.skipped == []
    root = str(tmp_path / "root")
    table = _table(root, "sw")
    assert [r["run"] for r in table["trials"]] == ["sw-tau0.1-seed0", "sw-tau0.2-seed0"]
    assert storage.exists(storage.join(root, SWEEPS, "sw", TABLE_MD))
    for row, tau in zip(table["trials"], (0.1, 0.2)):
        run_dir = storage.join(root, "runs", row["run"])
        saved = storage.read_bytes(storage.join(run_dir, "config.yaml")).decode()
        assert f"tau: {tau}" in saved and "seed: 0" in saved
        assert storage.exists(storage.join(run_dir, REPORT_FILE))
        assert row["checkpoint"] == newest_checkpoint_url(run_dir) and row["checkpoint"].endswith("00000004")
        z, labels, _ = embed_split(row["checkpoint"], fmnist_shards["manifest"], "eval")
        again = evaluate_embeddings(z, labels).to_dict()
        for key in ("recall_at_1", "recall_at_5", "map_at_r"):
            assert row[key] == pytest.approx(again["retrieval"][key], abs=1e-9), key
        for key in ("opis", "eps_opis"):
            assert row[key] == pytest.approx(again["opis"][key], rel=1e-6, abs=1e-12), key
        floor = pixel_floor(fmnist_shards["manifest"], "eval", image_size=28, channels=1, cache=False)
        assert (row["floor_recall_at_1"], row["floor_map_at_r"]) == (floor["recall_at_k"]["1"], floor["map_at_r"])
    assert table["trials"][0]["recall_at_1"] != table["trials"][1]["recall_at_1"] or \
        table["trials"][0]["opis"] != table["trials"][1]["opis"]  # two distinct models were evaluated


def _mtimes(run_dir: str) -> dict[str, float]:
    out = {}
    for base, _, files in os.walk(run_dir):
        for f in files:
            if f != "lease.json":
                out[os.path.join(base, f)] = os.stat(os.path.join(base, f)).st_mtime_ns
    return out


def test_a_killed_sweep_started_again_does_not_rerun_its_finished_trial(tmp_path, fmnist_shards):
    config = _config_file(tmp_path, fmnist_shards, "kill")
    root = str(tmp_path / "root")
    first, second = (os.path.join(root, "runs", f"kill-tau{t}-seed0") for t in ("0.1", "0.2"))
    cmd = [sys.executable, "-m", "flows.cli", "sweep", config, "--grid", GRID[0]]
    env = {**os.environ, "PYTHONPATH": REPO}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(first, REPORT_FILE)):  # two 2-worker trials run one at a time here
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        _kill_group(driver.pid)
    assert not os.path.exists(os.path.join(second, REPORT_FILE))
    before = _mtimes(first)

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 trial(s) to run, 1 finished before" in again.stdout
    assert _mtimes(first) == before  # the finished trial: not one file written again
    table = _table(root, "kill")
    assert [r["run"] for r in table["trials"]] == ["kill-tau0.1-seed0", "kill-tau0.2-seed0"]
    assert "tau0.2-seed0" in again.stdout and "ran 1, finished before 1" in again.stdout  # the rich table


def _kill_group(pgid: int) -> None:
    """Whatever the killed driver left in its session (its in-process Ray), so later tests get the cores."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("grid, expected", [
    ("loss.tau=0.1,-1", "loss.tau must be > 0, got -1"),  # a trial's config is invalid: named
    ("loss.taux=0.1", "unknown key(s) loss.taux"),
    ("loss.tau", "--grid 'loss.tau': expected key.path=v1,v2"),
])
def test_a_bad_grid_is_one_line_before_any_compute(grid, expected, tmp_path):
    shards = {"name": "none", "version": None, "root": str(tmp_path / "data")}
    config = _config_file(tmp_path, shards, "bad")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", config, "--grid", grid], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith("dml: error: ") and expected in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "root" / "runs") and not os.path.exists(tmp_path / "root" / SWEEPS)

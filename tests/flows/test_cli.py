"""The `dml` command: errors as one line before any compute (a real `dml` process), the story of `runs`, the
summary table from summary rows, each command reaching its flow (stand-in flow modules until the real flows
are merged). `dml query`: test_cli_query.py."""
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

import pytest
import yaml
from typer.testing import CliRunner

from dml_core.config import ConfigError, RunItem, config_from_dict, run_overrides
from flows.cli import app
from flows.summary import HEADERS, SUMMARY_FILE, summary_markdown, summary_table
from tests.flows._cli_helpers import REPO, dml_command


# ---------------------------------------------------------------- helpers -----------------------

@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """Tables unwrapped whatever runs the tests (a terminal of any width, or a pytest worker)."""
    monkeypatch.setenv("COLUMNS", "200")


def write_config(tmp_path, name: str = "run", **sections) -> str:
    raw = {"run": {"name": "r1", "root": str(tmp_path / "root")},
           "train": {"steps": 2}, "ray": {"num_workers": 1}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


ROW1 = {"run": "v1", "model_version": "v1", "gallery_model": "v1", "recall_at_1": 0.5, "map_at_r": 0.25,
        "floor_recall_at_1": 0.4, "floor_map_at_r": 0.2, "below_floor": False, "opis": 0.0123, "eps_opis": 0.001,
        "m_new_new": 0.5, "m_new_old": None, "m_old_old": None, "nfr": None,
        "verdict": "first model", "backfill": True, "reasons": [], "finished_at": "2026-01-01T00:00:00Z"}
ROW2 = {**ROW1, "run": "v2", "model_version": "v2", "recall_at_1": 0.625, "m_new_new": 0.625, "m_new_old": 0.55,
        "m_old_old": 0.5, "nfr": 0.0, "verdict": "compatible", "backfill": False, "reasons": ["NFR 0 <= 0.02"]}
ROW3 = {**ROW1, "run": "v3", "recall_at_1": 0.3, "m_new_new": 0.3, "m_new_old": 0.1, "m_old_old": 0.5, "nfr": 0.4,
        "below_floor": True, "verdict": "rejected", "backfill": False}


class StandIn:
    """A stand-in flow module (FLOWS writes the real ones) recording its calls."""

    def __init__(self, monkeypatch, module: str, **results):
        self.calls = []
        mod = types.ModuleType(module)
        for name, result in results.items():
            setattr(mod, name, self._flow(name, result))
        monkeypatch.setitem(sys.modules, module, mod)

    def _flow(self, name, result):
        def flow(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result
        return flow


# ---------------------------------------------------------------- errors: a real `dml` process -----

@pytest.fixture
def ray_temp():
    """A short ray.temp_dir that an in-process Ray would create; it must stay absent."""
    base = tempfile.mkdtemp(prefix="dmlcli", dir="/tmp")
    yield base + "/ray"
    shutil.rmtree(base, ignore_errors=True)


def _error_case(case: str, tmp_path, ray_temp):
    """(dml arguments, extra environment, what the one line must say) of an error case."""
    config = write_config(tmp_path, ray={"temp_dir": ray_temp, "num_workers": 1})
    port = closed_port()
    if case == "bad_field":
        return ["train", config, "--set", "train.stepz=1"], {}, "run.yaml: unknown key(s) train.stepz"
    if case == "missing_config":
        return ["run", str(tmp_path / "nope.yaml")], {}, f"config file not found: {tmp_path}/nope.yaml"
    if case == "storage_root":
        return (["train", config, "--set", f"run.root={tmp_path}/no/such/root"], {},
                f"run.root: storage root {tmp_path}/no/such/root cannot be created")
    if case == "ray_address":
        return (["run", config, "--set", f"ray.address=127.0.0.1:{port}"], {},
                f"ray.address 127.0.0.1:{port}: no Ray cluster answers")
    return (["train", config], {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
            f"PREFECT_API_URL http://127.0.0.1:{port}/api: the Prefect API does not answer")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("case", ["bad_field", "missing_config", "storage_root", "ray_address", "prefect_api"])
def test_an_error_is_one_line_before_any_compute(case, tmp_path, ray_temp):
    args, env_extra, expected = _error_case(case, tmp_path, ray_temp)
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env.update(PYTHONPATH=REPO, **env_extra)
    t0, cpu0 = time.monotonic(), _children_cpu()
    out = subprocess.run(dml_command() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed, cpu = time.monotonic() - t0, _children_cpu() - cpu0
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(lines) == 1 and lines[0].startswith("dml: error: "), out.stderr
    assert expected in lines[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert cpu < 10 and elapsed < 60, (cpu, elapsed)  # seconds of work (about 2 here); wall time as load allows
    assert os.listdir(root) == []  # no run folder, no dataset
    assert not os.path.exists(ray_temp)  # no in-process Ray started


def test_debug_adds_the_traceback(tmp_path):
    out = subprocess.run(dml_command() + ["train", write_config(tmp_path), "--set", "train.stepz=1", "--debug"],
                         env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "ConfigError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("dml: error: ")


# ---------------------------------------------------------------- the story of `runs` ------------

def test_runs_are_validated_naming_the_item(tmp_path):
    base = {"run": {"root": str(tmp_path)}}
    cfg = config_from_dict({**base, "runs": [{"name": "v1"}, {"name": "v2", "set": {"train.steps": 5}}]})
    assert [(r.name, r.set) for r in cfg.runs] == [("v1", {}), ("v2", {"train.steps": 5})]
    assert config_from_dict(base).runs == []
    for runs, match in [({"name": "v1"}, r"runs must be a list"),
                        ([{"name": "v1"}, {"nam": "v2"}], r"unknown key\(s\) runs\[1\]\.nam"),
                        ([{"name": "v1"}, "v2"], r"runs\[1\] must be a mapping"),
                        ([{"set": {}}], r"runs\[0\]\.name must be a non-empty name"),
                        ([{"name": "a/b"}], r"runs\[0\]\.name must be a non-empty name"),
                        ([{"name": "v1"}, {"name": "v1"}], r"runs\[1\]\.name repeats 'v1'"),
                        ([{"name": "v1", "set": [1]}], r"runs\[0\]\.set must be a mapping"),
                        ([{"name": "v1", "set": {"train..steps": 1}}], r"runs\[0\]\.set key 'train\.\.steps'")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "runs": runs})


def test_run_overrides_order_name_then_set_then_command_line():
    item = RunItem("v2", {"train.steps": 5, "loss.bct": {"old_checkpoint": "gallery"}, "ray.address": None})
    assert run_overrides(item, ["train.steps=7"]) == [
        "run.name=v2", "train.steps=5", 'loss.bct={"old_checkpoint": "gallery"}', "ray.address=null", "train.steps=7"]


def test_summary_table_and_markdown_from_rows():
    md = summary_markdown([ROW1, ROW2, ROW3])
    assert md.splitlines() == [
        "| run | Recall@1 | MAP@R | OPIS | eps-OPIS | M(new,new) | M(new,old) | M(old,old) | NFR | verdict | backfill |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| floor (raw pixels) | 0.4000 | 0.2000 | - | - | - | - | - | - | - | - |",
        "| v1 | 0.5000 | 0.2500 | 0.0123 | 0.0010 | 0.5000 | - | - | - | first model | yes |",
        "| v2 | 0.6250 | 0.2500 | 0.0123 | 0.0010 | 0.6250 | 0.5500 | 0.5000 | 0.0000 | compatible | no |",
        "| v3 | 0.3000 | 0.2500 | 0.0123 | 0.0010 | 0.3000 | 0.1000 | 0.5000 | 0.4000 | rejected (below floor) | no |"]
    table = summary_table([ROW1, ROW2])
    assert [c.header for c in table.columns] == list(HEADERS)
    assert [c._cells for c in table.columns][6] == ["-", "-", "0.5500"]
    assert [c._cells for c in table.columns][10] == ["-", "yes", "no"]


def test_dml_run_runs_the_story_in_order_and_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    rows = {"v1": ROW1, "v2": ROW2}
    flows = StandIn(monkeypatch, "flows.retrain",
                    retrain_flow=lambda config, overrides: rows[overrides[0].split("=")[1]])
    config = write_config(tmp_path, runs=[{"name": "v1"}, {"name": "v2", "set": {"train.steps": 5}}])
    (tmp_path / "root").mkdir()
    result = CliRunner().invoke(app, ["run", config, "--set", "train.lr=0.01"])
    assert result.exit_code == 0, result.output
    assert [c[1] for c in flows.calls] == [(config, ["run.name=v1", "train.lr=0.01"]),
                                           (config, ["run.name=v2", "train.steps=5", "train.lr=0.01"])]
    assert (tmp_path / "root" / SUMMARY_FILE).read_text() == summary_markdown([ROW1, ROW2])
    assert "0.5500" in result.stdout and "floor (raw pixels)" in result.stdout and "compatible" in result.stdout


def test_dml_run_without_runs_is_one_retrain(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    flows = StandIn(monkeypatch, "flows.retrain", retrain_flow=ROW1)
    config = write_config(tmp_path)
    result = CliRunner().invoke(app, ["run", config, "-s", "train.steps=3"])
    assert result.exit_code == 0, result.output
    assert [c[1] for c in flows.calls] == [(config, ["train.steps=3"])]
    assert (tmp_path / "root" / SUMMARY_FILE).read_text() == summary_markdown([ROW1])


def test_a_bad_run_of_the_story_stops_before_any_run(tmp_path, monkeypatch):
    flows = StandIn(monkeypatch, "flows.retrain", retrain_flow=ROW1)
    config = write_config(tmp_path, runs=[{"name": "v1"}, {"name": "v2", "set": {"train.stepz": 5}}])
    result = CliRunner().invoke(app, ["run", config])
    assert result.exit_code == 1 and flows.calls == []
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "runs[1] (v2)" in result.stderr and "train.stepz" in result.stderr


def test_a_failed_run_keeps_the_summary_of_the_runs_before(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    def retrain(config, overrides):
        if "run.name=v2" in overrides:
            raise RuntimeError("training diverged\nat step 3")
        return ROW1

    StandIn(monkeypatch, "flows.retrain", retrain_flow=retrain)
    config = write_config(tmp_path, runs=[{"name": "v1"}, {"name": "v2"}])
    result = CliRunner().invoke(app, ["run", config])
    assert result.exit_code == 1
    assert result.stderr == "dml: error: RuntimeError: training diverged at step 3 (--debug shows the traceback)\n"
    assert (tmp_path / "root" / SUMMARY_FILE).read_text() == summary_markdown([ROW1])


def test_each_stage_command_calls_its_flow(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    flows = StandIn(monkeypatch, "flows.stages", shard_flow={"dataset": "d", "version": "v", "resharded": False},
                    train_flow={"run": "r1", "checkpoint": "c", "steps": 2}, backfill_flow={"gallery": "g"},
                    transform_flow={"gallery": "g"}, evaluate_flow={**ROW2, "reasons": ["NFR 0 <= 0.02"]})
    serve = StandIn(monkeypatch, "flows.serve", serve=None)
    status = StandIn(monkeypatch, "flows.status", status_tables=lambda config, overrides: [summary_table([ROW1])])
    config = write_config(tmp_path)
    runner = CliRunner()
    for args in (["shard", config], ["train", config, "--set", "train.steps=4"],
                 ["backfill", config, "--checkpoint", "ck"], ["backfill", config, "--budget", "0.3"],
                 ["transform", config, "--checkpoint", "ck"], ["evaluate", config, "--checkpoint", "ck", "--old", "o"],
                 ["serve", config, "--cron", "* * * * *"], ["status", config]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert flows.calls == [("shard_flow", (config, []), {}), ("train_flow", (config, ["train.steps=4"]), {}),
                           ("backfill_flow", (config, []), {"checkpoint": "ck", "budget": None}),
                           ("backfill_flow", (config, []), {"checkpoint": None, "budget": 0.3}),
                           ("transform_flow", (config, []), {"checkpoint": "ck"}),
                           ("evaluate_flow", (config, []), {"checkpoint": "ck", "old": "o"})]
    assert serve.calls == [("serve", (config, "* * * * *", []), {})]
    assert status.calls == [("status_tables", (config, []), {})]
    assert "NFR 0 <= 0.02" in runner.invoke(app, ["evaluate", config]).stdout
    result = runner.invoke(app, ["backfill", config, "--budget", "1.5"])  # a share of the gallery: refused
    assert result.exit_code != 0 and "budget" in result.output

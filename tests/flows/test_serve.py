"""Scheduled serving against a real local Prefect server: `serve` starts the server, a cron schedule (every
minute; every 15 s in the overlap test) starts real flow runs, one at a time, and SIGTERM or SIGINT stops everything it started, a flow run
in progress too.

`dml serve` serves the real retrain flow; the overlap test serves tests/flows/_tiny_flow.py (the retrain
flow's signature, a sleep instead of the work) to hold a run open across the next tick."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tests.tasks._train_helpers import REPO, DescendantWatch

pytest.importorskip("ray")  # DescendantWatch's psutil: Ray's vendored copy when psutil is not installed
pytestmark = pytest.mark.slow
ENTRYPOINT = "tests.flows._tiny_flow:tiny_flow"


def _serve_env(tmp_path, **extra: str) -> dict:
    """serve's environment: no Prefect API (serve starts its own server), and that server's scheduler and the
    runner polling every 2 s instead of every 60 s and 10 s, so a tick's run starts within seconds of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONPATH": REPO, "HOME": str(tmp_path), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2", **extra}


def _start_serve(tmp_path, sleep: float, cron: str) -> tuple[subprocess.Popen, str]:
    root, config = tmp_path / "root", tmp_path / "serve.yaml"
    config.write_text(f"run: {{name: nightly, root: {root}}}\n")
    env = _serve_env(tmp_path, DML_TINY_FLOW_SLEEP=str(sleep))
    code = (f"from flows.serve import serve; serve({str(config)!r}, {cron!r}, ['train.steps=3'], "
            f"entrypoint={ENTRYPOINT!r})")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, str(log)


def _killing_on_failure(wait):
    """A wait for serve's `proc` that kills it when the wait fails, so a failed test leaves no server."""
    def waiting(proc: subprocess.Popen, *args, **kwargs):
        try:
            return wait(proc, *args, **kwargs)
        except BaseException:
            proc.kill()
            raise
    return waiting


@_killing_on_failure
def _wait_for(proc: subprocess.Popen, log: str, pattern: str, timeout: float) -> str:
    """The first path matching `pattern` (a glob), waiting while `proc` serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{open(log).read()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"nothing matched {pattern} in {timeout} s:\n{open(log).read()[-3000:]}")


def _stop(proc: subprocess.Popen, watch: DescendantWatch, sig: int, log: str) -> str:
    """Send `sig`, expect a clean exit and no descendant left; return serve's output."""
    watch.sample()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        watch.stop()
    output = open(log).read()
    assert rc == 0, output[-3000:]
    assert watch.seen, "serve started no process (no Prefect server?)"
    assert watch.survivors() == [], output[-3000:]
    return output


def _api_url(output: str) -> str:
    return re.search(r"Prefect API (http://127\.0\.0\.1:\d+/api)", output).group(1)


def _port_closed(output: str) -> bool:
    port = int(_api_url(output).rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@_killing_on_failure
def _wait_for_cancelled_tick(proc: subprocess.Popen, log: str, running: str, timeout: float) -> dict:
    """A scheduled run other than `running` that the server cancelled (the deployment runs one at a time)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{open(log).read()[-3000:]}"
        runs = httpx.post(f"{_api_url(open(log).read())}/flow_runs/filter", json={}, timeout=30).json()
        cancelled = [r for r in runs if r["id"] != running and r["state_type"] == "CANCELLED"]
        if cancelled:
            return cancelled[0]
        time.sleep(2)
    raise AssertionError(f"no overlapping run was cancelled in {timeout} s:\n{open(log).read()[-3000:]}")


def test_runs_never_overlap_and_sigint_during_a_run_cancels_it_leaving_no_process(tmp_path):
    proc, log = _start_serve(tmp_path, sleep=600, cron="* * * * * */15")  # croniter's sixth field: every 15 s
    watch = DescendantWatch(proc.pid)
    started = _wait_for(proc, log, str(tmp_path / "root" / "tiny-runs" / "*.started.json"), timeout=300)
    run = json.load(open(started))
    # the next tick comes while this run sleeps: cancelled, never started
    tick = _wait_for_cancelled_tick(proc, log, run["flow_run"], timeout=150)
    assert datetime.fromisoformat(tick["expected_start_time"]) > datetime.fromisoformat(run["scheduled_start"])
    assert glob.glob(str(tmp_path / "root" / "tiny-runs" / "*")) == [started]
    output = _stop(proc, watch, signal.SIGINT, log)
    assert run["pid"] in {pid for pid, _ in watch.seen}  # the flow-run process was serve's, and has ended
    assert not os.path.exists(started.replace(".started", ".finished"))  # it never finished
    assert _port_closed(output)


def test_a_bad_cron_or_entrypoint_fails_before_any_server_starts(tmp_path):
    from flows.serve import serve

    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{name: x, root: {tmp_path / 'root'}}}\n")
    with pytest.raises(ValueError, match=r"--cron '61 \* \* \* \*' is not a valid cron expression"):
        serve(str(config), "61 * * * *", entrypoint=ENTRYPOINT)
    with pytest.raises(ValueError, match="has no Prefect flow named 'nope'"):
        serve(str(config), "* * * * *", entrypoint="tests.flows._tiny_flow:nope")
    with pytest.raises(ValueError, match="expected module.path:flow_name"):
        serve(str(config), "* * * * *", entrypoint="tests.flows._tiny_flow")
    assert not (tmp_path / "root" / "prefect").exists()


def test_dml_serve_runs_the_retrain_flow_from_cron_as_a_run_of_its_own(tmp_path):
    """The real command and the real retrain flow: the minute's tick trains (with the command's `--set`),
    evaluates and registers `nightly-<scheduled minute>` on tiny data, then SIGTERM pauses the schedule, stops
    the server and leaves no process behind."""
    from dml_core.gallery.registry import Registry
    from dml_core.training.state import checkpoint_dir_name
    from tests.flows._cli_helpers import dml_command
    from tests.flows._flow_helpers import DATASET, write_config

    root = tmp_path / "root"
    config = write_config(str(tmp_path), run={"name": "nightly", "root": str(root)}, train={"steps": 600})
    # --set train.steps=300 below: the command's items reach the flow (300 steps clear the raw-pixel floor)
    env = _serve_env(tmp_path)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*dml_command(), "serve", config, "--cron", "* * * * *", "--set", "train.steps=300"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    watch = DescendantWatch(proc.pid)
    _wait_for(proc, str(log), str(root / "registry.json"), timeout=480)  # written last
    output = _stop(proc, watch, signal.SIGTERM, str(log))
    (summary,) = glob.glob(str(root / "runs" / "nightly-*" / "evaluation" / "summary.json"))
    row = json.load(open(summary))
    assert re.fullmatch(r"nightly-\d{8}-\d{4}", row["run"]) and row["verdict"] == "first model"
    entry = Registry(str(root)).gallery(DATASET)
    assert entry.gallery_model.version == entry.query_model.version == row["model_version"]
    assert entry.gallery_model.checkpoint.endswith(checkpoint_dir_name(300))  # --set train.steps=300 reached it
    assert (root / "prefect" / "prefect.db").exists()  # the server's home: under run.root
    assert _port_closed(output)
    assert "All deployments have been paused" in output

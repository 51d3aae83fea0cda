"""A flow's Ray session: what the flow starts it shuts down, and a SIGTERM in the middle of the shutdown waits
for it (Prefect cancels a flow run with SIGTERM; cut short, the shutdown leaves Ray's agents behind)."""
from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray")


def _start_local_ray() -> None:
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING", _temp_dir=f"/tmp/dmlray-s{os.getpid()}")


def test_a_sigterm_during_the_shutdown_is_delivered_after_it(monkeypatch):
    from tasks import ray_runtime

    if ray.is_initialized():
        ray.shutdown()
    _start_local_ray()
    real_shutdown, seen = ray.shutdown, []

    def shutdown_signalled_midway() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a handler running now would see Ray still up
        real_shutdown()

    monkeypatch.setattr(ray, "shutdown", shutdown_signalled_midway)
    sigint = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append(ray.is_initialized()))
    try:
        ray_runtime.shutdown_ray()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [False]  # delivered once, after Ray was down
    assert signal.getsignal(signal.SIGINT) is sigint  # both handlers are back


def test_the_outermost_session_shuts_down_the_ray_started_inside_it():
    from tasks.ray_runtime import ray_session

    if ray.is_initialized():
        ray.shutdown()
    with ray_session():  # `dml run` around its runs' flows
        with ray_session():
            _start_local_ray()
        assert ray.is_initialized()  # kept for the next flow
    assert not ray.is_initialized()
    _start_local_ray()
    try:
        with ray_session():
            pass
        assert ray.is_initialized()  # the caller's own Ray is left to the caller
    finally:
        ray.shutdown()


def test_the_default_ray_temp_dir_is_short_stable_and_outside_the_run_root(tmp_path, monkeypatch):
    import tempfile

    from dml_core.config import RAY_TEMP_DIR_MAX_LEN, config_from_dict
    from tasks.ray_runtime import ray_temp_dir

    cfg = config_from_dict({"run": {"name": "r", "root": str(tmp_path / "root")}})
    first = ray_temp_dir(cfg, cfg.run_dir)
    assert first == ray_temp_dir(cfg, cfg.run_dir) != ray_temp_dir(cfg, cfg.run_dir + "-other")
    assert os.path.dirname(first) == tempfile.gettempdir() and not first.startswith(cfg.run.root)
    assert len(first) <= RAY_TEMP_DIR_MAX_LEN
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / ("long" * 20)))
    assert os.path.dirname(ray_temp_dir(cfg, cfg.run_dir)) == "/tmp"  # a long temp dir falls back to /tmp
    cfg.ray.temp_dir = str(tmp_path / "mine")
    assert ray_temp_dir(cfg, cfg.run_dir) == cfg.ray.temp_dir


def test_a_worker_dies_with_the_raylet_that_started_it():
    """`die_with_raylet` in a worker: a SIGKILL of its raylet (a local driver's death brings one) kills it at once,
    where Ray's own check lets a busy worker run on for seconds. Here a plain process stands in for the raylet."""
    import subprocess
    import sys
    import time

    import psutil

    worker = "import os; from tasks.ray_runtime import die_with_raylet; die_with_raylet(); print(os.getpid(), flush=True)"
    worker += "; import time; time.sleep(600)"
    raylet = subprocess.Popen(  # starts the worker with RAY_RAYLET_PID set, as a raylet does, and keeps no stdout
        [sys.executable, "-c", "import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
         "env={**os.environ, 'RAY_RAYLET_PID': str(os.getpid())}); os.close(1); time.sleep(600)", worker],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = raylet.stdout.readline()  # the worker's pid once its death signal is set (empty if it failed)
    child = psutil.Process(int(line))
    try:
        raylet.kill()
        raylet.wait()
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:  # nobody reaps it here
            assert time.monotonic() < deadline, "the worker outlived its raylet"
            time.sleep(0.05)
    finally:
        if child.is_running():
            child.kill()

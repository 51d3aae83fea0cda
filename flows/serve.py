"""Scheduled retraining (`dml serve CONFIG --cron EXPR`): a Prefect deployment of the retrain flow with a cron
schedule, served by this process until SIGINT or SIGTERM.

The ephemeral Prefect API cannot schedule, so without PREFECT_API_URL a local Prefect server is started
(tasks/prefect_server.py; its database under `<run.root>/prefect`, or `~/.dml/prefect` when the root is not
a local folder) and stopped again at the end. Runs never overlap: a tick that comes while the last run is
still going is cancelled. On a signal the runner stops (a flow run in progress is cancelled), the
deployment's schedule is paused, and every process started here ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import os
import signal
import threading
from collections.abc import Iterator

from dml_core import storage
from dml_core.config import Config, load_config, parse_overrides

RETRAIN_ENTRYPOINT = "flows.retrain:retrain_flow"


def serve(config: str, cron: str, overrides: list[str] | None = None,
          entrypoint: str = RETRAIN_ENTRYPOINT) -> None:
    """Run `entrypoint(config=<abs path>, overrides=...)` on the `cron` schedule; blocks until SIGINT/SIGTERM."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    config = storage.local_path(config) if storage.is_local(config) else config
    overrides = list(overrides or [])
    cfg = load_config(config, parse_overrides(overrides))  # a bad config fails before anything starts
    try:
        CronSchedule(cron=cron)
    except ValueError as e:
        raise ValueError(f"--cron {cron!r} is not a valid cron expression (e.g. '0 3 * * *': daily at 03:00)") from e
    flow = load_flow(entrypoint)
    with prefect_api(cfg) as api_url:
        # one run at a time: a tick that comes while the last run is still going is cancelled, not queued
        one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
        deployment = flow.to_deployment(name=cfg.run.name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
                                        parameters={"config": config, "overrides": overrides},
                                        concurrency_limit=one_at_a_time)
        print(f"serving {entrypoint} as deployment '{flow.name}/{cfg.run.name}' on the schedule {cron!r}; "
              f"Prefect API {api_url}; Ctrl-C stops", flush=True)
        _serve_until_signal(deployment)


def load_flow(entrypoint: str):
    """The Prefect flow named `module.path:attribute`; its module's root goes on PYTHONPATH for the flow runs."""
    from prefect import Flow

    module_name, sep, attr = entrypoint.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entrypoint {entrypoint!r}: expected module.path:flow_name")
    module = importlib.import_module(module_name)
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow):
        raise ValueError(f"entrypoint {entrypoint!r}: {module_name} has no Prefect flow named {attr!r}")
    if flow.__module__ != module_name:  # the deployment imports the flow by its own module's path
        raise ValueError(f"entrypoint {entrypoint!r}: name the module that defines the flow ({flow.__module__})")
    _importable_in_children(module)
    return flow


def _importable_in_children(module) -> None:
    """Flow runs are new processes: let them import the flow's module from where this one did."""
    root = os.path.abspath(module.__file__)
    for _ in module.__name__.split("."):
        root = os.path.dirname(root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


@contextlib.contextmanager
def prefect_api(cfg: Config) -> Iterator[str]:
    """PREFECT_API_URL when set; else a local Prefect server started for the duration (this process uses it)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.prefect_server import PrefectServer

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    home = os.path.join(storage.local_path(cfg.run.root), "prefect") if storage.is_local(cfg.run.root) else \
        os.path.expanduser("~/.dml/prefect")
    print(f"PREFECT_API_URL is not set: starting a local Prefect server (database in {home})", flush=True)
    with PrefectServer(home) as server:
        os.environ["PREFECT_API_URL"] = server.api_url  # for the flow-run processes
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                yield server.api_url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def _serve_until_signal(deployment) -> None:
    """Serve in a thread (so Prefect's runner installs no signal handlers of its own); the main thread waits
    for SIGINT/SIGTERM, then stops the runner, which cancels a flow run in progress and pauses the schedule."""
    from prefect.runner import Runner

    runner = Runner(name=f"dml-serve-{deployment.name}", pause_on_shutdown=True)
    stop, started = threading.Event(), {}

    async def run() -> None:
        started["loop"] = asyncio.get_running_loop()
        await runner.add_deployment(deployment)
        await runner.start()

    def thread_main() -> None:
        try:
            asyncio.run(run())
        except BaseException as e:  # reported by the main thread
            started["error"] = e
        finally:
            stop.set()

    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=contextvars.copy_context().run, args=(thread_main,), name="dml-serve")
    try:
        thread.start()
        while not stop.wait(0.5):
            pass
        if thread.is_alive() and runner.started:
            print("stopping: cancelling flow runs in progress and pausing the schedule", flush=True)
            asyncio.run_coroutine_threadsafe(runner.astop(), started["loop"]).result(timeout=120)
        thread.join(timeout=120)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in started:
        raise RuntimeError(f"serving {deployment.name} failed: {started['error']}") from started["error"]


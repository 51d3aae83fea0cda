"""Starting or joining Ray for a run: in-process by default (fast, hermetic, no dashboard), or a cluster
when `ray.address` is set. Also the worker environment (S3 endpoint, Ray Train intervals) and the
placement check that fails before training when the cluster cannot hold the requested workers."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import tempfile
import threading

import ray

from dml_core import retry
from dml_core.child_process import die_with_parent
from dml_core.config import RAY_TEMP_DIR_MAX_LEN as MAX_TEMP_DIR_LEN
from dml_core.config import Config

START_ATTEMPTS = 3

# Worker log lines known to be harmless here, kept off the user's console:
# - Ray Train's PlacementGroupCleaner polls the state API, which needs the dashboard that an in-process Ray
#   runs without; with in-process Ray its job (freeing a dead controller's resources) ends with the driver.
# - an internal note of Ray Train's own PreemptionWatcher actor about its restart arguments.
HARMLESS_LOG_LINES = ("Failed to query Ray Train Controller actor state",
                      "Actor with class name: 'PreemptionWatcher' and ID:")

# Fast failure detection for local runs; a user's own setting wins.
DEFAULT_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # a busy machine can take more than the default 30 s to start a node's agents
    "RAY_agent_register_timeout_ms": "120000",
    "RAY_raylet_start_wait_time_s": "120",
    # Ray starts worker processes at nice 15, so on a busy node a training or backfill worker yields its core
    # to every other process (the driver, Ray's own daemons, other jobs): here the workers are the job.
    # (Read by the raylet this process starts; a cluster's nodes keep their own setting.)
    "RAY_worker_niceness": "0",
    # every worker here runs torch: import it (1-2 s) while the worker idles, not when a task or actor starts
    "RAY_preload_python_modules": "torch",
    # Ray 2.60 gives each worker a process group of its own; kept in the driver's, every process of a local Ray
    # gets a signal to the group (a killed `dml` command) at once, instead of workers running on without a raylet
    "RAY_process_group_cleanup_enabled": "0",
}


def ray_temp_dir(cfg: Config, run_dir: str) -> str:
    """`ray.temp_dir`, else a short stable dir per run under the system temp dir (never inside `run.root`,
    so a full run disk cannot take Ray down; short for Ray's socket paths)."""
    if cfg.ray.temp_dir:
        return cfg.ray.temp_dir
    name = f"dmlray-{hashlib.sha1(run_dir.encode()).hexdigest()[:8]}"
    base = tempfile.gettempdir()
    return os.path.join(base if len(base) + len(name) < MAX_TEMP_DIR_LEN else "/tmp", name)


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables every Ray worker gets (never credentials: nodes hold their own)."""
    env = {k: os.environ.get(k, v) for k, v in DEFAULT_ENV.items()}
    endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env[retry.RETRY_ENV] = repr(float(cfg.storage.retry_seconds))
    return env


def init_ray(cfg: Config, run_dir: str = "") -> None:
    """Start in-process Ray (temp dir: `ray_temp_dir`) or join `cfg.ray.address`; idempotent."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": worker_env(cfg)}, log_to_driver=True)
        return
    # Local workers inherit this environment from the raylet: no job runtime env, so tasks and actors can
    # start on the workers Ray starts with the node (about 0.2 s) instead of new ones (about 1 s).
    os.environ.update(worker_env(cfg))
    _quiet_token_auth_notice()
    temp_dir = ray_temp_dir(cfg, run_dir)
    os.makedirs(temp_dir, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            # address "local": a new instance even when `ray start` runs a cluster on this machine
            ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True,
                     configure_logging=True, logging_level="WARNING")
            _drop_harmless_worker_logs()
            return
        except Exception as e:  # the raylet aborts if its agents start slowly (an overloaded machine)
            ray.shutdown()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"local Ray failed to start {attempt} times; logs under {temp_dir}") from e


_sessions = 0  # ray_session()s open in this process


@contextlib.contextmanager
def ray_session():
    """Ray for the length of a flow: the Ray the body starts is shut down when the outermost session ends
    (before a flow run reports its state, so a flow-run process stopped after that leaves no Ray process
    behind). `dml run` opens one around its runs, so they share one Ray; a Ray started before is left alone."""
    global _sessions
    started_before = ray.is_initialized()
    _sessions += 1
    try:
        yield
    finally:
        _sessions -= 1
        if _sessions == 0 and not started_before and ray.is_initialized():
            shutdown_ray()


def shutdown_ray() -> None:
    """`ray.shutdown()` with SIGTERM and SIGINT held until it is done (then delivered): a signal in the middle
    of it (Prefect cancels a flow run with SIGTERM) would leave Ray's agents running without their raylet."""
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda sig, _: held.append(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for s in held:
        signal.raise_signal(s)


class _DropTokenAuthNotice(logging.Filter):
    """Ray's notice that a new local cluster uses token authentication (it does, and that is right)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_auth_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


def _drop_harmless_worker_logs() -> None:
    """Filter HARMLESS_LOG_LINES out of the worker output Ray forwards to this process (Ray has no public
    filter for it; if its private dispatcher changes, everything is printed as before)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handler = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)
    if handler is None:
        return

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not any(n in line for n in HARMLESS_LOG_LINES)]
        if lines:
            handler({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def die_with_raylet() -> None:
    """In a Ray worker (Linux): be killed with the raylet that started it. A local raylet dies with its driver
    (Ray's fate sharing), and Ray's own check lets a busy worker run on for seconds, writing results of a run
    that is gone; a cluster's workers already end with their job. No-op where the raylet is not the parent."""
    raylet = int(os.environ.get("RAY_RAYLET_PID", "0"))
    if os.getppid() != raylet:
        return
    die_with_parent(signal.SIGKILL)
    if os.getppid() != raylet:  # it died before the line above
        os._exit(1)


def quiet_worker_logging() -> None:
    """In a Ray Train worker: Ray Train's INFO records (one "Reporting training result ..." per report, from a
    logger named after its source file) stay in Ray's log files; the console keeps warnings and our output."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and "ray/train" in name.replace(os.sep, "/"):
            logger.setLevel(logging.WARNING)


def check_placement(cfg: Config) -> None:
    """Raise if the cluster cannot place `num_workers` workers of `resources_per_worker` (plus GPUs)."""
    need = worker_resources(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [n.get("Resources", {}) for n in nodes]
    total = ray.cluster_resources()
    for res, amount in need.items():
        if amount and total.get(res, 0) < amount * cfg.ray.num_workers:
            raise ValueError(
                f"ray.num_workers={cfg.ray.num_workers} workers need {amount * cfg.ray.num_workers:g} {res} "
                f"in total, but the cluster has {total.get(res, 0):g}; lower ray.num_workers or "
                f"ray.resources_per_worker, or add nodes")
    slots = sum(min(int(r.get(res, 0) // amount) for res, amount in need.items() if amount) if any(need.values())
                else cfg.ray.num_workers for r in per_node)
    if slots < cfg.ray.num_workers:
        raise ValueError(f"ray.num_workers={cfg.ray.num_workers} workers of {need} cannot be placed: the "
                         f"{len(per_node)} node(s) hold only {slots} such bundle(s)")


def worker_resources(cfg: Config) -> dict[str, float]:
    res = dict(cfg.ray.resources_per_worker)
    if cfg.ray.use_gpu:
        res.setdefault("GPU", 1.0)
    return res

"""Starting or joining Ray for a run: in-process by default (fast, hermetic, no dashboard), or a cluster
when `ray.address` is set. Also the worker environment (S3 endpoint, Ray Train intervals) and the
placement check that fails before training when the cluster cannot hold the requested workers."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import ray

from dml_core import storage
from dml_core.config import Config

# Unix socket paths are limited to ~107 bytes; Ray appends about 60 (session_<date>_<pid>/sockets/...).
MAX_TEMP_DIR_LEN = 40

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
}


def short_temp_dir(preferred: str | None) -> str:
    """`preferred` when it is short enough for Ray's socket paths, else a short stable dir under /tmp."""
    if preferred and len(os.path.abspath(preferred)) <= MAX_TEMP_DIR_LEN:
        return os.path.abspath(preferred)
    key = hashlib.sha1(os.path.abspath(preferred or "dml").encode()).hexdigest()[:8]
    return os.path.join(tempfile.gettempdir(), f"dmlray-{key}")


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables every Ray worker gets (never credentials: nodes hold their own)."""
    env = {k: os.environ.get(k, v) for k, v in DEFAULT_ENV.items()}
    endpoint = cfg.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def init_ray(cfg: Config, run_dir: str | None = None) -> None:
    """Start in-process Ray (temp dir beside the run when local) or join `cfg.ray.address`; idempotent."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env(cfg)}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=True)
        return
    _quiet_token_auth_notice()
    local_run_dir = storage.local_path(run_dir) if run_dir and storage.is_local(run_dir) else None
    temp_dir = short_temp_dir(os.path.join(local_run_dir, "ray") if local_run_dir else None)
    os.makedirs(temp_dir, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(include_dashboard=False, _temp_dir=temp_dir, runtime_env=runtime_env, log_to_driver=True,
                     configure_logging=True, logging_level="WARNING")
            _drop_harmless_worker_logs()
            return
        except Exception as e:  # the raylet aborts if its agents start slowly (an overloaded machine)
            ray.shutdown()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"local Ray failed to start {attempt} times; logs under {temp_dir}") from e


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

"""The training stage on Ray Train: a `TorchTrainer` whose workers run `dml_core.training.loop.fit`.

Ray brings the worker processes, the process group (gloo on CPU, NCCL on GPU), checkpoint upload to the
run's storage and restarts after a worker failure (`ray.max_failures`); everything else is the library's.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

import ray
import ray.train

from dml_core import storage
from dml_core.config import Config, ConfigError, config_from_dict
from dml_core.data.manifest import ManifestError
from dml_core.training.loop import Worker, fit
from dml_core.training.preflight import preflight
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name, prune_checkpoints
from tasks import ray_runtime


# Errors a restart cannot fix (bad config or data, a diverged loss): Ray restarts the worker group for any
# error, so the first one is recorded on storage and the restarted group stops at once instead of training.
RECURRING_ERRORS = (ConfigError, ManifestError, FloatingPointError)


class TrainingError(RuntimeError):
    """Training stopped on an error that would recur on every restart; the message is the worker's."""


@dataclass
class TrainingResult:
    run_dir: str
    checkpoint: str | None  # URL of the latest checkpoint directory
    metrics: dict  # the last reported metrics
    final: dict  # what rank 0's loop returned (step, start_step, node ids, loss state digest)
    ray_result: Any


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(metrics["step"]))


def train_worker(loop_config: dict) -> dict:
    """Ray Train entry point on every worker."""
    import gc

    import torch

    gc.freeze()  # Ray's many long-lived objects stay out of the collections each training step triggers

    cfg = config_from_dict(loop_config["config"])
    manifest = loop_config["manifest"]
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.ray.resources_per_worker.get("CPU", 1))))
    worker = Worker(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), node_id=ray.get_runtime_context().get_node_id(),
                    report=_report, on_step=loop_config.get("on_step"))
    failed = storage.join(cfg.run_dir, f".failed-{loop_config['attempt']}")
    if storage.exists(failed):
        return {"error": storage.read_bytes(failed).decode()}
    try:
        return fit(cfg, manifest, worker)
    except RECURRING_ERRORS as e:
        storage.write_bytes_atomic(failed, f"{type(e).__name__}: {e}".encode())
        raise


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train: local absolute path, or s3 through fsspec."""
    if storage.is_local(url):
        return storage.local_path(url), None
    import pyarrow.fs

    fs, path = storage.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _dir_name(checkpoint) -> str:
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_url(run: str, checkpoint) -> str | None:
    return None if checkpoint is None else storage.join(run, CHECKPOINTS, _dir_name(checkpoint))


def run_training(cfg: Config, on_step: Callable[[int, int], None] | None = None) -> TrainingResult:
    """Check, then train `cfg` on Ray (resuming `run.name` if it has checkpoints).

    At the end the run keeps its newest checkpoint and the `train.keep_best` with the lowest `loss_avg` (the
    mean training loss since the previous checkpoint), also among directories Ray never registered.

    `on_step(step, rank)` (picklable) runs on every worker before every step: a hook for callers that
    watch or perturb training, such as the fault-injection tests.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage.use_endpoint(cfg.storage.endpoint_url)
    run = cfg.run_dir
    manifest = preflight(cfg)
    ray_runtime.init_ray(cfg, run)
    ray_runtime.check_placement(cfg)
    storage.write_bytes_atomic(storage.join(run, "config.yaml"), cfg.to_yaml().encode())
    storage_path, storage_fs = ray_storage(run)
    attempt = uuid.uuid4().hex  # names this call's record of a recurring error
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "manifest": manifest, "on_step": on_step,
                           "attempt": attempt},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=dict(cfg.ray.resources_per_worker)),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_best,
                                               checkpoint_score_attribute="loss_avg", checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": ray_runtime.worker_env(cfg)}),
    )
    try:
        result = trainer.fit()
    finally:
        fs, marker = storage.filesystem(storage.join(run, f".failed-{attempt}"))
        if fs.exists(marker):
            fs.rm(marker)
    if result.error is not None:
        raise result.error
    final = dict(result.return_value or {})
    if "error" in final:
        raise TrainingError(f"training stopped, not retried (it would fail again): {final['error']}")
    for url in prune_checkpoints(storage.join(run, CHECKPOINTS), cfg.train.keep_best):
        print(f"[train] removed {url} (train.keep_best={cfg.train.keep_best} ranks checkpoints by loss_avg)", flush=True)
    return TrainingResult(run_dir=run, checkpoint=checkpoint_url(run, result.checkpoint),
                          metrics=dict(result.metrics or {}), final=final,
                          ray_result=result)

"""The training stage on Ray Train: a `TorchTrainer` whose workers run `dml_core.training.loop.fit`.

Ray brings the worker processes, the process group (gloo on CPU, NCCL on GPU) and restarts after a worker
failure (`ray.max_failures`); everything else is the library's, checkpoints included: rank 0 writes them to
the run's storage itself, and Ray keeps only its own bookkeeping, on local disk outside `run.root`.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import ray
import ray.train

from dml_core import storage
from dml_core.config import Config, ConfigError, config_from_dict
from dml_core.data.manifest import ManifestError
from dml_core.models.checkpoint import CheckpointError
from dml_core.training.lease import LEASE, LeaseLostError, RunLease
from dml_core.training.loop import Worker, fit
from dml_core.training.preflight import preflight
from dml_core.training.resume_config import set_aside
from dml_core.training.skipped import KEYS as SKIPPED_KEYS
from dml_core.training.state import CHECKPOINTS, checkpoint_metrics, checkpoint_names, prune_checkpoints
from tasks import ray_runtime


# Errors a restart cannot fix (bad config or data, a diverged loss): Ray restarts the worker group for any
# error, so the first one is recorded on storage and the restarted group stops at once instead of training.
RECURRING_ERRORS = (ConfigError, ManifestError, FloatingPointError, CheckpointError)
RECURRING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full or read-only disk stays so


def recurs(e: BaseException) -> bool:
    return isinstance(e, RECURRING_ERRORS) or (isinstance(e, OSError) and e.errno in RECURRING_ERRNOS)


@ray.remote(num_cpus=0)
class FirstError:
    """The first recurring error of a run, kept off storage (which may be the thing that failed) for the
    restarted worker group to find."""

    def __init__(self) -> None:
        self.message: str | None = None

    def record(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str | None:
        return self.message


class TrainingError(RuntimeError):
    """Training stopped on an error that would recur on every restart; the message is the worker's."""


@dataclass
class TrainingResult:
    run_dir: str
    checkpoint: str | None  # URL of the latest checkpoint directory
    metrics: dict  # the metrics of the latest checkpoint
    final: dict  # what rank 0's loop returned (step, start_step, node ids, loss state digest)
    ray_result: Any

    @property
    def skipped(self) -> dict[str, int]:
        """Shard reads and samples skipped by `data.on_error: skip` (and the samples of those reads trained on
        before the error), over all workers and restarts."""
        return {k: int(self.final.get(k, 0)) for k in SKIPPED_KEYS}


def _report(metrics: dict, checkpoint_url: str | None) -> None:
    ray.train.report(metrics)  # the checkpoint is on storage already; Ray only hears the metrics


def train_worker(loop_config: dict) -> dict:
    """Ray Train entry point on every worker."""
    cfg = config_from_dict(loop_config["config"])
    worker = worker_context(cfg, loop_config)
    return run_worker(loop_config, lambda: fit(cfg, loop_config["manifest"], worker))


def fit_on_ray(cfg: Config, worker_fn, loop_config: dict, run_dir: str, callbacks: list | None = None):
    """`worker_fn(loop_config)` on `ray.num_workers` Ray Train workers (a process group, restarts after a
    failure); `loop_config` gains `first_error`, the actor that stops a restarted group after a recurring error.
    Ray's bookkeeping stays on local disk and is removed after the run; returns Ray's result."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_runtime.init_ray(cfg, run_dir)
    ray_runtime.check_placement(cfg)
    bookkeeping = os.path.join(ray_runtime.ray_temp_dir(cfg, run_dir), "train")  # Ray's own, never on run storage
    name = f"{cfg.run.name}-{uuid.uuid4().hex[:12]}"  # a fresh record per call: resuming is ours, from storage
    first_error = FirstError.remote()
    trainer = TorchTrainer(
        worker_fn, train_loop_config={**loop_config, "first_error": first_error},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=dict(cfg.ray.resources_per_worker)),
        run_config=RunConfig(
            name=name, storage_path=bookkeeping, failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO stays in its log files
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": ray_runtime.worker_env(cfg)}),
    )
    try:
        result = trainer.fit()
    finally:
        ray.kill(first_error)
        shutil.rmtree(os.path.join(bookkeeping, name), ignore_errors=True)
    if result.error is not None:
        raise result.error
    final = dict(result.return_value or {})
    if "error" in final:
        raise TrainingError(f"training stopped, not retried (it would fail again): {final['error']}")
    return result


def worker_context(cfg: Config, loop_config: dict) -> Worker:
    """On a Ray Train worker: storage and torch threads set from the config, and who this worker is."""
    import gc

    import torch

    gc.freeze()  # Ray's many long-lived objects stay out of the collections each training step triggers
    ray_runtime.quiet_worker_logging()
    ray_runtime.die_with_raylet()  # a killed driver leaves no worker training
    storage.configure(cfg.storage)
    torch.set_num_threads(max(1, int(cfg.ray.resources_per_worker.get("CPU", 1))))
    ctx = ray.train.get_context()
    return Worker(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=ray.train.torch.get_device(),
                  node_id=ray.get_runtime_context().get_node_id(), report=_report, on_step=loop_config.get("on_step"))


def run_worker(loop_config: dict, fit_fn: Callable[[], dict]) -> dict:
    """`fit_fn()` unless an earlier group recorded a recurring error; records its own recurring error."""
    first_error = loop_config["first_error"]
    message = ray.get(first_error.get.remote())
    if message is not None:
        return {"error": message}
    try:
        return fit_fn()
    except Exception as e:
        if recurs(e):
            ray.get(first_error.record.remote(f"{type(e).__name__}: {e}"))
        raise


def newest_checkpoint_url(run: str) -> str | None:
    names = checkpoint_names(storage.join(run, CHECKPOINTS))
    return storage.join(run, CHECKPOINTS, names[-1]) if names else None


def run_training(cfg: Config, on_step: Callable[[int, int], None] | None = None,
                 callbacks: list | None = None) -> TrainingResult:
    """Check, then train `cfg` on Ray (resuming `run.name` if it has checkpoints).

    The run keeps its newest checkpoint and the `train.keep_best` with the lowest `loss_avg` (the mean
    training loss since the previous checkpoint), pruned on storage after every checkpoint and at the end.
    An error that would recur (a full disk, a bad config) ends the run with `TrainingError` at once.

    `on_step(step, rank)` (picklable) runs on every worker before every step: a hook for callers that
    watch or perturb training, such as the fault-injection tests. The run's lease (`run.lease_seconds`)
    is held from before Ray starts to the end: a second driver on the same run is refused. `callbacks`
    (`ray.train.UserCallback`s) go to the trainer, e.g. Tune's report callback when a sweep runs the trainer.
    """
    storage.configure(cfg.storage)
    manifest = preflight(cfg)
    with RunLease.acquire(cfg.run_dir, cfg.run.lease_seconds) as lease:  # one writer: refused if held
        if cfg.run.fresh_start:
            moved = set_aside(cfg.run_dir, keep=(LEASE, f"{LEASE}.lock"))
            if moved:
                print(f"[train] run.fresh_start: the run's earlier files are now under {moved}", flush=True)
        result = _train(cfg, manifest, on_step, callbacks)
    if lease.lost:
        raise LeaseLostError(f"{lease.lost} while this run trained; check {cfg.run_dir} before using it")
    return result


def _train(cfg: Config, manifest, on_step, callbacks=None) -> TrainingResult:
    run = cfg.run_dir
    storage.write_bytes_atomic(storage.join(run, "config.yaml"), cfg.to_yaml().encode())
    result = fit_on_ray(cfg, train_worker, {"config": cfg.to_dict(), "manifest": manifest, "on_step": on_step},
                        run, callbacks)
    final = dict(result.return_value or {})
    for url in prune_checkpoints(storage.join(run, CHECKPOINTS), cfg.train.keep_best):
        print(f"[train] removed {url} (train.keep_best={cfg.train.keep_best} ranks checkpoints by loss_avg)", flush=True)
    checkpoint = newest_checkpoint_url(run)
    out = TrainingResult(run_dir=run, checkpoint=checkpoint,
                         metrics=checkpoint_metrics(checkpoint) if checkpoint else {}, final=final,
                         ray_result=result)
    if any(out.skipped.values()):
        print(f"[train] data.on_error=skip: the run skipped {out.skipped['skipped_shards']} shard read(s) (after "
              f"{out.skipped['samples_from_skipped_shards']} of their samples were read and trained on) and "
              f"{out.skipped['skipped_samples']} sample(s); the messages are in {run}/metrics.jsonl", flush=True)
    return out

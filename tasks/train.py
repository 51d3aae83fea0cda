"""Multi-worker contrastive training on Ray Train: the per-worker loop and `run_training`.

Checkpoints (model, optimizer, LR schedule, loss state such as the decomposable `zbar`, step, config)
go to `<root>/runs/<run>/checkpoints/` every `train.checkpoint_every` steps and at the end; worker
failures restart the group from the latest one (`ray.max_failures`), and starting the same run name
again resumes it. Rank 0 prints progress and appends per-step metrics to `<root>/runs/<run>/metrics.jsonl`.
"""
from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from dml_core.config import Config, config_from_dict
from dml_core.data import storage
from dml_core.data.shard_stream import setup_storage
from dml_core.training.build import build_loss, build_model_from_config, build_optimizer, build_schedule
from dml_core.training.metrics_log import MetricsLog
from dml_core.training.state import checkpoint_dir_name, load_state, newest_checkpoint, restore_state, save_state
from dml_core.training.step import train_step
from tasks import ray_runtime
from tasks.train_checks import DataInfo, preflight, run_dir

CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------ worker side -----------------

def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _maybe_fault(fault: dict | None, step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker at `fault.step` on `fault.rank`, once (a marker file records it)."""
    if not fault or step != fault["step"] or rank != fault.get("rank", 0):
        return
    if os.path.exists(fault["marker"]):
        return
    with open(fault["marker"], "w") as f:
        f.write(f"killed pid {os.getpid()} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _bct_weights(cfg: Config, info: DataInfo, rank: int, world: int, device) -> torch.Tensor | None:
    """BCT prototypes from the old model over the training split, each rank embedding its share."""
    if cfg.loss.bct is None:
        return None
    from dml_core.data.eval_reader import EvalReader
    from dml_core.training.bct import load_old_model, prototype_sums, prototypes_from_sums

    reader = EvalReader.from_manifest(info.root, info.name, info.version, "train", rank=rank, world_size=world,
                                      batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.loader_workers,
                                      endpoint_url=cfg.storage.endpoint_url, image_size=cfg.model.image_size,
                                      channels=cfg.model.in_channels)
    old = load_old_model(cfg.loss.bct.old_checkpoint).to(device)
    sums, counts = prototype_sums(old, reader, info.num_train_labels, device)
    if dist.is_initialized():
        both = torch.cat([sums, counts[:, None]], dim=1)
        both = both.to(device) if dist.get_backend() == "nccl" else both
        dist.all_reduce(both)
        sums, counts = both[:, :-1].cpu(), both[:, -1].cpu()
    return prototypes_from_sums(sums, counts).to(device)


def _batches(cfg: Config, info: DataInfo, rank: int, world: int, start: int, device):
    """(images, labels, ids) on `device` for steps start..steps-1; two views in self-supervised mode."""
    from dml_core.data.augment import AugmentConfig, augment, two_views
    from dml_core.data.train_reader import TrainReader

    supervised = cfg.loss.objective == "supervised"
    reader = TrainReader.from_manifest(
        info.root, info.name, info.version, "train", rank=rank, world_size=world, steps=cfg.train.steps - start,
        num_workers=cfg.data.loader_workers, endpoint_url=cfg.storage.endpoint_url,
        mode=cfg.loss.objective, p=cfg.data.p if supervised else None, k=cfg.data.k if supervised else None,
        batch_size=None if supervised else cfg.data.batch_size, image_size=cfg.model.image_size,
        channels=cfg.model.in_channels, seed=cfg.train.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank * 104729 + start)
    aug = AugmentConfig()
    for batch in reader.epoch(start):  # the epoch number reseeds the stream after a resume
        images, labels, ids = batch.images.to(device), batch.labels.to(device), batch.ids.to(device)
        if not supervised:
            v1, v2 = two_views(images, aug, gen)
            images, labels, ids = torch.cat([v1, v2]), torch.cat([ids, ids]), torch.cat([ids, ids])
        elif cfg.data.augment:
            images = augment(images, aug, gen)
        yield images, labels, ids


def _loss_state(loss: torch.nn.Module) -> dict:
    """Digest of the decomposable state (for logs and the resume check), if the loss has one."""
    for name, buf in loss.named_buffers():
        if name.endswith("zbar"):
            seen = dict(loss.named_buffers())[name[: -len("zbar")] + "seen"]
            return {"zbar_digest": tensor_digest(buf), "zbar_seen": int(seen.sum())}
    return {}


def _checkpoint(step: int, model, optimizer, scheduler, loss, cfg_dict: dict, metrics: dict, rank: int) -> None:
    ckpt = None
    with tempfile.TemporaryDirectory(prefix="dml-ckpt-") as tmp:
        if rank == 0:
            save_state(tmp, model, optimizer, scheduler, loss, step, cfg_dict, metrics)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step))


def _resume_state(run: str, rank: int, world: int) -> dict | None:
    """The state of the run's newest complete checkpoint on storage, or None for a fresh start.

    Read from storage rather than `ray.train.get_checkpoint()`: a worker killed right after a report can
    keep Ray's controller from registering that checkpoint, although it was fully written. Rank 0 picks
    the directory and every rank loads that one.
    """
    found = newest_checkpoint(storage.join(run, CHECKPOINTS)) if rank == 0 else None
    url = found[0] if found else None
    if world > 1 and dist.is_initialized():
        box = [url]
        dist.broadcast_object_list(box, src=0)
        url = box[0]
    if url is None:
        return None
    return found[1] if found else load_state(url)


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train entry point: build everything, resume if a checkpoint exists, train, checkpoint."""
    cfg = config_from_dict(loop_config["config"])
    info = DataInfo(**loop_config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_storage(cfg.storage.endpoint_url)
    torch.set_num_threads(max(1, int(cfg.ray.resources_per_worker.get("CPU", 1))))
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()

    model = build_model_from_config(cfg).to(device)
    loss = build_loss(cfg, info.num_samples, _bct_weights(cfg, info, rank, world, device)).to(device)
    optimizer, start = build_optimizer(cfg, model), 0
    scheduler = build_schedule(cfg, optimizer)
    resumed = _resume_state(loop_config["run_dir"], rank, world)
    if resumed is not None:
        start = restore_state(resumed, model, optimizer, scheduler, loss)
    model = ray.train.torch.prepare_model(model) if world > 1 else model
    grad_cache = None
    if cfg.train.grad_cache_chunk:
        from dml_core.gradcache import GradCache

        grad_cache = GradCache(model, loss, cfg.train.grad_cache_chunk,
                               autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)

    node_ids = _gather_node_ids(world)
    log = MetricsLog(storage.join(loop_config["run_dir"], "metrics.jsonl")) if rank == 0 else None
    if log is not None:
        log.log({"event": "resumed" if resumed is not None else "started", "step": start,
                 "node_ids": node_ids, **_loss_state(loss)})
    cfg_dict, steps, every = cfg.to_dict(), cfg.train.steps, cfg.train.checkpoint_every
    t0, window, last = time.perf_counter(), [], {}
    step = start
    batches = _batches(cfg, info, rank, world, start, device) if start < steps else iter(())
    for images, labels, ids in batches:
        _maybe_fault(loop_config.get("fault"), step, rank)
        stats = train_step(model, loss, images, labels, ids, optimizer, scheduler, grad_cache, step=step)
        stats["loss"] = _global_mean(stats["loss"], world)
        step += 1
        window.append(stats["loss"])
        if rank == 0:
            now = time.perf_counter()
            stats["samples_per_s"] = images.shape[0] * world / max(now - t0, 1e-9)
            t0 = now
            log.log({"step": step, **stats})
            if step % cfg.train.log_every == 0 or step == steps:
                _progress(step, steps, stats)
        if step % every == 0 or step == steps:
            last = {"step": step, "loss": stats["loss"], "loss_avg": sum(window) / len(window)}
            window = []
            _checkpoint(step, model, optimizer, scheduler, loss, cfg_dict, {**last, **_loss_state(loss)}, rank)
    if log is not None:
        log.close()
    return {"step": step, "start_step": start, "node_ids": node_ids, **last, **_loss_state(loss)}


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order."""
    me = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [me]
    out = [None] * world
    dist.all_gather_object(out, me)
    return out


def _global_mean(value: float, world: int) -> float:
    """The global-batch loss: each rank returns its share (METHODS.md 1.2), whose mean is the global loss."""
    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _progress(step: int, steps: int, stats: dict) -> None:
    width = 20
    done = int(width * step / steps)
    extra = " ".join(f"{k.split('/')[-1]}={v:.0f}" for k, v in stats.items() if k.endswith(("hard_pos", "hard_neg")))
    print(f"[train] [{'#' * done}{'.' * (width - done)}] step {step}/{steps} loss {stats['loss']:.4f} "
          f"lr {stats['lr']:.2e} {stats['samples_per_s']:.0f} samples/s {extra}".rstrip(), flush=True)


# ------------------------------------------------------------------ driver side -----------------

@dataclass
class TrainingResult:
    run_dir: str
    checkpoint: str | None  # URL of the latest checkpoint directory
    metrics: dict  # the last reported metrics
    final: dict  # what rank 0's loop returned (step, start_step, loss state digest)
    ray_result: Any


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train: local absolute path, or s3 through fsspec."""
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return os.path.abspath(path), None
    import pyarrow.fs

    fs, path = storage.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def checkpoint_url(run: str, checkpoint) -> str | None:
    return None if checkpoint is None else storage.join(run, CHECKPOINTS, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def run_training(cfg: Config, fault: dict | None = None) -> TrainingResult:
    """Validate, then train `cfg` on Ray (resuming `run.name` if it has checkpoints)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    setup_storage(cfg.storage.endpoint_url)
    run = run_dir(cfg)
    info = preflight(cfg)
    ray_runtime.init_ray(cfg, run)
    ray_runtime.check_placement(cfg)
    storage.write_bytes_atomic(storage.join(run, "config.yaml"), cfg.to_yaml().encode())
    storage_path, storage_fs = ray_storage(run)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data": info.to_dict(), "run_dir": run, "fault": fault},
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
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return TrainingResult(run_dir=run, checkpoint=checkpoint_url(run, result.checkpoint),
                          metrics=dict(result.metrics or {}), final=dict(result.return_value or {}),
                          ray_result=result)

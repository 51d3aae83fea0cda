"""The per-worker training loop as plain PyTorch: build, resume, train, log, checkpoint.

`fit` runs on every rank of a run. The caller (Ray Train in `tasks/train.py`, or a plain process) sets up
the process group and says who this worker is with a `Worker`; `Worker.report` is told of each checkpoint.
Rank 0 writes checkpoints straight to `<run dir>/checkpoints/` (each file atomically) and prunes them to
`train.keep_best`. They hold the model, optimizer, LR schedule, the loss's state (such as the decomposable
`zbar` or the class proxies) and the step; a restarted or re-run worker group resumes from the newest
complete one on storage. The loss's own parameters (proxies) are not in the model's DDP: their gradients
are averaged over ranks after each backward (`average_loss_grads`), so every rank keeps the same ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from dml_core import storage
from dml_core.config import PROXY_LOSSES
from dml_core.distributed import average_loss_grads
from dml_core.losses import DistributedLoss
from dml_core.models.checkpoint import read_checkpoint
from dml_core.training.batches import training_batches
from dml_core.training.build import (build_loss, build_model_from_config, build_optimizer, build_schedule,
                                     num_proxy_classes)
from dml_core.training.embed import model_url
from dml_core.training.metrics_log import MetricsLog
from dml_core.training.pc import old_model_inputs
from dml_core.training.skipped import SkippedData
from dml_core.training.state import (CHECKPOINTS, checkpoint_dir_name, load_state, newest_checkpoint,
                                     prune_checkpoints, restore_state, save_state, state_digest)
from dml_core.training.step import nan_suspects, train_step

if TYPE_CHECKING:
    from dml_core.config import Config
    from dml_core.data.manifest import Manifest


def _no_report(metrics: dict, checkpoint_dir: str | None) -> None:
    pass


@dataclass
class Worker:
    """Who runs the loop. `report(metrics, checkpoint_url)` is called on every rank at every checkpoint, with
    the checkpoint's storage URL on rank 0 (None elsewhere); `on_step(step, rank)` before every step."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_id: str = ""
    report: Callable[[dict, str | None], None] = _no_report
    on_step: Callable[[int, int], None] | None = None


def fit(cfg: "Config", manifest: "Manifest", worker: Worker) -> dict:
    """Train `cfg` on `manifest`'s training split from the newest checkpoint of `cfg.run_dir` (or step 0).

    Returns this rank's summary: `step`, `start_step`, `node_ids` (every rank's), the last checkpoint's
    metrics, `loss_state_digest` and the run's `skipped_shards` / `skipped_samples` (data.on_error: skip).
    """
    rank, world, device = worker.rank, worker.world_size, worker.device
    torch.manual_seed(cfg.train.seed)
    model = build_model_from_config(cfg).to(device)
    old = old_model_inputs(cfg, manifest, rank, world, device)  # BCT's prototypes, PC's old embeddings
    num_classes = num_proxy_classes(cfg, manifest) if cfg.loss.base in PROXY_LOSSES else None
    loss = build_loss(cfg, manifest.num_ids, old.prototypes, old.embeddings, num_classes).to(device)
    optimizer = build_optimizer(cfg, model, loss)
    scheduler = build_schedule(cfg, optimizer)
    resumed = resume_state(cfg.run_dir, rank, world)
    if resumed is None and cfg.train.init_checkpoint:
        model.load_state_dict(read_checkpoint(model_url(cfg.train.init_checkpoint))["state_dict"])
    start = restore_state(resumed, model, optimizer, scheduler, loss) if resumed is not None else 0
    skipped = SkippedData(resumed.get("metrics") if resumed is not None else None)
    loss_fn = loss
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        loss_fn = DistributedLoss(loss)
    grad_cache = None
    if cfg.train.grad_cache_chunk:
        from dml_core.gradcache import GradCache

        grad_cache = GradCache(model, loss_fn, cfg.train.grad_cache_chunk,
                               autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    node_ids = all_node_ids(worker.node_id, world)
    log = MetricsLog(storage.join(cfg.run_dir, "metrics.jsonl")) if rank == 0 else None
    if log is not None:
        log.log({"event": "resumed" if resumed is not None else "started", "step": start, "node_ids": node_ids,
                 "loss_state_digest": state_digest(loss.state_dict())})
    steps, every = cfg.train.steps, cfg.train.checkpoint_every
    sync_loss_grads = world > 1 and any(p.requires_grad for p in loss.parameters())
    step, window, last, t0 = start, [], {}, time.perf_counter()
    batches = (training_batches(cfg, manifest, rank, world, start, device, skipped.errors) if start < steps
               else iter(()))
    batches = old.feed(batches)  # PC with old_embeddings: on_the_fly runs the old model on each batch
    nan_hint = nan_suspects(cfg)  # the same config every step: format it once
    try:  # the records logged so far reach storage even when a step raises
        for images, labels, ids in batches:
            if worker.on_step is not None:
                worker.on_step(step, rank)
            stats = train_step(model, loss_fn, images, labels, ids, optimizer, scheduler, grad_cache, step=step,
                               before_update=(lambda: average_loss_grads(loss)) if sync_loss_grads else None,
                               nan_hint=nan_hint)
            stats = global_mean(stats, world, device)
            step += 1
            window.append(stats["loss"])
            if log is not None:
                now = time.perf_counter()
                stats["samples_per_s"], t0 = images.shape[0] * world / max(now - t0, 1e-9), now
                log.log({"step": step, **stats})
                if step % cfg.train.log_every == 0 or step == steps:
                    print_progress(step, steps, stats)
            if step % every == 0 or step == steps:
                last = {"step": step, "loss": stats["loss"], "loss_avg": sum(window) / len(window),
                        "loss_state_digest": state_digest(loss.state_dict()), **skipped.collect(world, step, log)}
                window = []
                if log is not None:
                    log.flush()  # before the checkpoint: a resume from it must find every step up to it
                _checkpoint(worker, cfg, model, optimizer, scheduler, loss, last)
    finally:
        if log is not None:
            log.close()
    return {"step": step, "start_step": start, "node_ids": node_ids, **skipped.counts(), **last,
            "loss_state_digest": state_digest(loss.state_dict())}


def _checkpoint(worker: Worker, cfg: "Config", model, optimizer, scheduler, loss, metrics: dict) -> None:
    """Rank 0 writes the checkpoint to storage and prunes the older ones; then every rank reports."""
    url = None
    if worker.rank == 0:
        checkpoints = storage.join(cfg.run_dir, CHECKPOINTS)
        url = storage.join(checkpoints, checkpoint_dir_name(metrics["step"]))
        save_state(url, model, optimizer, scheduler, loss, metrics["step"], cfg.to_dict(), metrics)
        prune_checkpoints(checkpoints, cfg.train.keep_best)
    worker.report(metrics, url)


def resume_state(run_dir: str, rank: int, world: int) -> dict | None:
    """The state of the run's newest complete checkpoint on storage, or None for a fresh start.

    Read from storage rather than from the orchestrator's record: a worker killed right after a report can
    keep that record from being written, although the checkpoint was. Rank 0 picks it; every rank loads it.
    """
    found = newest_checkpoint(storage.join(run_dir, CHECKPOINTS)) if rank == 0 else None
    url = found[0] if found else None
    if world > 1:
        box = [url]
        dist.broadcast_object_list(box, src=0)
        url = box[0]
    if url is None:
        return None
    return found[1] if found else load_state(url)


def all_node_ids(node_id: str, world: int) -> list[str]:
    """Every rank's node id, in rank order (once per run)."""
    if world == 1:
        return [node_id]
    out = [None] * world
    dist.all_gather_object(out, node_id)
    return out


def global_mean(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The mean of every stat over the ranks, in one all-reduce. Each rank's loss is its share of the
    global-batch loss (METHODS.md 1.2), so the mean of the shares is the global loss."""
    if world == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


def print_progress(step: int, steps: int, stats: dict) -> None:
    width = 20
    done = int(width * step / steps)
    extra = " ".join(f"{k.split('/')[-1]}={v:.0f}" for k, v in stats.items() if k.endswith(("hard_pos", "hard_neg")))
    print(f"[train] [{'#' * done}{'.' * (width - done)}] step {step}/{steps} loss {stats['loss']:.4f} "
          f"lr {stats['lr']:.2e} {stats['samples_per_s']:.0f} samples/s {extra}".rstrip(), flush=True)

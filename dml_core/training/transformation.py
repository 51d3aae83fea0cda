"""Training the transformation h (METHODS 6.1) on every rank of a worker group, from embeddings of the
training split by the frozen old, new (and side-info) models: no image is read while h trains.

Like `loop.fit`, it checkpoints to `<out_dir>/checkpoints/checkpoint_<step>/` (h, optimizer, schedule) and
resumes from the newest one there. Each step's global batch is drawn with replacement from a generator
seeded by (seed, step), so a resumed run draws the same batches as an uninterrupted one; rank r takes the
r-th equal slice of it, and DDP's gradient average is the gradient of the global batch's mean loss.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dml_core import storage
from dml_core.losses.transformation import transformation_loss
from dml_core.models.transformation import Transformation
from dml_core.training.build import lr_factor
from dml_core.training.loop import Worker, global_mean, resume_state
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name, prune_checkpoints, restore_state, save_state

TRAINING_DATA = "training_data.npz"


@dataclass
class TransformationData:
    """The training split's embeddings by the old, new and (optional) side model, row-aligned by sample id."""

    old: torch.Tensor
    new: torch.Tensor
    labels: torch.Tensor
    side: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.old)
        if len(self.new) != n or len(self.labels) != n or (self.side is not None and len(self.side) != n):
            raise ValueError("old, new, labels (and side) must have one row per training item each")
        if n < 2:
            raise ValueError(f"a transformation needs at least 2 training items, got {n}")

    def save(self, url: str) -> None:
        arrays = {"old": self.old.numpy(), "new": self.new.numpy(), "labels": self.labels.numpy()}
        if self.side is not None:
            arrays["side"] = self.side.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        storage.write_bytes_atomic(url, buf.getvalue())

    @classmethod
    def load(cls, url: str) -> "TransformationData":
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as a:
            side = torch.from_numpy(a["side"]) if "side" in a.files else None
            return cls(torch.from_numpy(a["old"]), torch.from_numpy(a["new"]), torch.from_numpy(a["labels"]), side)


def class_prototypes(new: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(num labels, D): the L2-normalised mean new embedding of each training class (zero rows for labels
    with no item), FastFill's clusters without a classifier head."""
    sums = torch.zeros(int(labels.max()) + 1, new.shape[1]).index_add_(0, labels.long(), new.float())
    return F.normalize(sums, dim=1)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step`: `batch_size` row indices drawn with replacement, the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=g)


def build_transformation(t, data: TransformationData) -> Transformation:
    """h for `data`'s dimensions with the widths of `t` (a `TransformationSection`)."""
    return Transformation(data.old.shape[1], data.new.shape[1], 0 if data.side is None else data.side.shape[1],
                          t.branch_width, t.trunk_width, t.uncertainty)


def fit_transformation(t, data: TransformationData, out_dir: str, worker: Worker, seed: int = 0,
                       config: dict | None = None) -> dict:
    """Train h with the settings of `t` (a `TransformationSection`) on `data`, checkpointing under `out_dir`.
    Returns this rank's summary: `step`, `start_step`, `loss` (the last step's) and, on rank 0 at the end,
    `mse` (mean ||new - h||^2 over all of `data`) and `checkpoint` (the final checkpoint's URL)."""
    rank, world, device = worker.rank, worker.world_size, worker.device
    torch.manual_seed(seed)
    h = build_transformation(t, data).to(device)
    optimizer = torch.optim.Adam(h.parameters(), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.steps, 0, "cosine"))
    resumed = resume_state(out_dir, rank, world)
    start = restore_state(resumed, h, optimizer, scheduler) if resumed is not None else 0
    model = torch.nn.parallel.DistributedDataParallel(h) if world > 1 else h
    use_clusters = t.uncertainty and t.lambda_c > 0
    protos = class_prototypes(data.new, data.labels).to(device) if use_clusters else None
    local = t.batch_size // world
    stats, url = {"loss": float("nan")}, None
    for step in range(start, t.steps):
        idx = batch_indices(len(data.old), t.batch_size, seed, step)[rank * local:(rank + 1) * local]
        side = None if data.side is None else data.side[idx].to(device)
        pred, log_var = model(data.old[idx].to(device), side)
        loss = transformation_loss(pred, data.new[idx].to(device), log_var, prototypes=protos,
                                   labels=data.labels[idx].long().to(device) if use_clusters else None,
                                   lambda_c=t.lambda_c, tau_c=t.tau_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % t.checkpoint_every == 0 or done == t.steps:
            stats = global_mean({"loss": float(loss.detach())}, world, device)
            metrics = {"step": done, "loss": stats["loss"], "loss_avg": stats["loss"]}
            if done == t.steps:
                metrics["mse"] = transformation_mse(h, data, device)
            url = _checkpoint(worker, out_dir, h, optimizer, scheduler, metrics, config)
            stats.update(metrics)
    return {"start_step": start, "step": max(start, t.steps), **stats, "checkpoint": url}


def _checkpoint(worker: Worker, out_dir: str, h, optimizer, scheduler, metrics: dict, config: dict | None):
    url = None
    if worker.rank == 0:
        checkpoints = storage.join(out_dir, CHECKPOINTS)
        url = storage.join(checkpoints, checkpoint_dir_name(metrics["step"]))
        save_state(url, h, optimizer, scheduler, None, metrics["step"], config or {}, metrics)
        prune_checkpoints(checkpoints, keep_best=0)  # the newest only: h's loss is no model-selection signal
    worker.report(metrics, url)
    return url


@torch.no_grad()
def transformation_mse(h: Transformation, data: TransformationData, device="cpu", chunk: int = 8192) -> float:
    """Mean ||new - h(old, side)||^2 over `data` in eval mode (the raw prediction, before normalisation)."""
    was_training = h.training
    h.eval()
    total = 0.0
    try:
        for i in range(0, len(data.old), chunk):
            side = None if data.side is None else data.side[i:i + chunk].to(device)
            pred = h(data.old[i:i + chunk].to(device), side)[0]
            total += float((pred.float().cpu() - data.new[i:i + chunk]).pow(2).sum())
    finally:
        h.train(was_training)
    return total / len(data.old)


@torch.no_grad()
def apply_transformation(h: Transformation, old: torch.Tensor, side: torch.Tensor | None = None,
                         chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h(old, side) L2-normalised, predicted log-variance or None), in chunks on h's device (eval mode),
    as float32 on the CPU: the transformed gallery."""
    device = next(h.parameters()).device
    was_training = h.training
    h.eval()
    zs, log_vars = [torch.empty(0, h.new_dim)], [torch.empty(0)]
    try:
        for i in range(0, len(old), chunk):
            s = None if side is None else side[i:i + chunk].float().to(device)
            pred, log_var = h(old[i:i + chunk].float().to(device), s)
            zs.append(F.normalize(pred.float(), dim=1).cpu())
            if log_var is not None:
                log_vars.append(log_var.float().cpu())
    finally:
        h.train(was_training)
    return torch.cat(zs), torch.cat(log_vars) if h.uncertainty else None

"""Training state on storage: `model.pt` ({spec, state_dict}, loadable with `models.checkpoint.load_model`),
`state.pt` (optimizer, LR schedule, loss buffers such as the decomposable `zbar`, step, config) and
`metrics.json` (the checkpoint's metrics, read by pruning). Each file is written atomically, the metrics last.

Only tensors and plain Python values are saved, so loading uses `torch.load(weights_only=True)` (through
`models.checkpoint.read_checkpoint`, whose errors name the file).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from typing import Any

import torch
from torch import nn

from dml_core import storage

CHECKPOINTS = "checkpoints"  # <run dir>/checkpoints/checkpoint_<step>/
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8}")  # checkpoint_<step>, zero-padded: names sort by step

log = logging.getLogger(__name__)


def checkpoint_dir_name(step: int) -> str:
    """The directory name of the checkpoint at `step` (matches CHECKPOINT_NAME)."""
    return f"checkpoint_{step:08d}"


def state_digest(state: dict) -> str:
    """A short hash of a state dict's tensors (key order): shows that a loss state was restored, not reset."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel (or similar) wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               scheduler: Any | None, loss: nn.Module | None, step: int, config: dict,
               metrics: dict | None = None) -> None:
    """Write `model.pt`, `state.pt` and `metrics.json` into `directory` (local path or storage URL), each
    atomically, so a crash or a full disk never leaves a torn file under a final name."""
    from dml_core.models.checkpoint import model_checkpoint

    state = {
        "step": int(step),
        "config": config,
        "optimizer": _cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scheduler": _cpu(scheduler.state_dict()) if scheduler is not None else None,
        "loss": _cpu(loss.state_dict()) if loss is not None else None,
        "metrics": dict(metrics or {}),
    }
    for name, obj in ((MODEL_FILE, model_checkpoint(unwrap(model))), (STATE_FILE, state)):
        buf = io.BytesIO()
        torch.save(obj, buf)
        storage.write_bytes_atomic(storage.join(directory, name), buf.getvalue())
    storage.write_bytes_atomic(storage.join(directory, METRICS_FILE), json.dumps(state["metrics"]).encode())


def load_state(directory: str) -> dict:
    """Read both files of a checkpoint directory (local path or storage URL); the model entry is the
    {spec, state_dict} dict."""
    from dml_core.models.checkpoint import read_checkpoint

    out = {}
    for key, name in (("model", MODEL_FILE), ("state", STATE_FILE)):
        url = storage.join(directory, name)
        if not storage.exists(url):
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
        out[key] = read_checkpoint(url)
    return {"model": out["model"], **out["state"]}


def checkpoint_names(checkpoints_url: str) -> list[str]:
    """The `checkpoint_<step>` directory names under `checkpoints_url`, oldest first."""
    return [n for n in storage.list_names(checkpoints_url) if CHECKPOINT_NAME.fullmatch(n)]


def newest_checkpoint(checkpoints_url: str) -> tuple[str, dict] | None:
    """The newest `checkpoint_<step>` directory under `checkpoints_url` whose files load, and its state.

    One left incomplete by a crash mid-write is skipped with a warning, so a run resumes from the one before.
    """
    for name in reversed(checkpoint_names(checkpoints_url)):
        url = storage.join(checkpoints_url, name)
        try:
            return url, load_state(url)
        except storage.StorageUnavailableError:
            raise  # the checkpoint may be fine: never resume from an older one because storage was away
        except Exception as e:  # truncated zip, missing file: anything that makes it unusable
            log.warning("skipping unreadable checkpoint %s: %s", url, e)
    return None


def checkpoint_metrics(url: str) -> dict:
    """The metrics of the checkpoint at `url`: its small `metrics.json`, or (older checkpoints) its state."""
    metrics_url = storage.join(url, METRICS_FILE)
    if storage.exists(metrics_url):
        return json.loads(storage.read_bytes(metrics_url))
    return load_state(url)["metrics"]


def prune_checkpoints(checkpoints_url: str, keep_best: int) -> list[str]:
    """Keep the newest `checkpoint_<step>` directory and the `keep_best` with the lowest `loss_avg`, delete the
    rest and any that is incomplete; returns the deleted URLs. Applies to every directory on storage,
    also those a worker wrote before it was killed, which the orchestrator never registered."""
    scores, unreadable = {}, []
    for name in checkpoint_names(checkpoints_url):
        try:
            scores[name] = float(checkpoint_metrics(storage.join(checkpoints_url, name)).get("loss_avg", math.inf))
        except storage.StorageUnavailableError:
            raise
        except Exception:  # torn or incomplete: of no use to a resume
            unreadable.append(name)
    keep = set(sorted(scores, key=scores.get)[:keep_best]) | set(sorted(scores)[-1:])
    gone = unreadable + [n for n in scores if n not in keep]
    for name in gone:
        storage.remove(storage.join(checkpoints_url, name), recursive=True)
    return [storage.join(checkpoints_url, n) for n in gone]


def restore_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Any | None = None, loss: nn.Module | None = None) -> int:
    """Load everything saved by `save_state` into live objects (strict); returns the step to resume at.

    One exception: the loss's parameters a checkpoint predates (class proxies, METHODS.md 2.1, resuming a run
    of another loss under `run.allow_config_change`) keep their initial values, in an optimizer group of
    their own that starts without state at the schedule's current step.
    """
    unwrap(model).load_state_dict(state["model"]["state_dict"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(_with_new_groups(state["optimizer"], optimizer))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
        _schedule_new_groups(scheduler)
    if loss is not None and state.get("loss") is not None:
        device = next((b.device for b in loss.buffers()), None)
        loss.load_state_dict(_with_new_parameters(state["loss"], loss))
        if device is not None:
            loss.to(device)
    return int(state["step"])


def _with_new_parameters(saved: dict, loss: nn.Module) -> dict:
    """The saved loss state, with the current value of each loss parameter it lacks (see `restore_state`)."""
    new = {name: p.detach() for name, p in loss.named_parameters() if name not in saved}
    if new:
        log.warning("the checkpoint has no %s of the loss: initial values used", ", ".join(new))
    return {**saved, **new}


def _with_new_groups(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved optimizer state, with the optimizer's param groups past the saved ones added, stateless."""
    groups, current = saved["param_groups"], optimizer.state_dict()["param_groups"]
    index = 1 + max((i for g in groups for i in g["params"]), default=-1)
    for group in current[len(groups):]:
        groups = groups + [{**group, "params": list(range(index, index + len(group["params"])))}]
        index += len(group["params"])
    return {**saved, "param_groups": groups}


def _schedule_new_groups(scheduler: Any) -> None:
    """A LambdaLR restored from a checkpoint with fewer param groups schedules the added ones too, from now."""
    groups = scheduler.optimizer.param_groups
    for i in range(len(scheduler.base_lrs), len(groups)):
        scheduler.base_lrs.append(groups[i]["initial_lr"])
        groups[i]["lr"] = groups[i]["initial_lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)

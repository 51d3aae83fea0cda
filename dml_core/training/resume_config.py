"""Resuming a run under a changed config: which fields may change, and the check before training.

A run resumes from its newest checkpoint. Its saved `<run_dir>/config.yaml` says what the checkpoint was
trained as; a new config that differs in the model, the loss, the data or the optimisation would continue
another experiment under the old name (or fail to load the weights), so it is refused, listing the fields.
`RESUMABLE_CHANGES` is the one list of fields that do not change what is trained; every other field,
including fields added later, must stay equal. `run.allow_config_change: true` continues anyway;
`run.fresh_start: true` sets the earlier attempt aside (`set_aside`) and starts over.
"""
from __future__ import annotations

import datetime as dt

import yaml

from dml_core import storage
from dml_core.config import Config, ConfigError
from dml_core.training.state import CHECKPOINTS

# Field paths (a path ending in "." covers a whole section) whose value may differ on resume: how long and
# how the run goes (steps, logging, checkpoints kept), where it runs and stores, and computation paths
# that give the same numbers (tiled losses, gradient caching: METHODS.md 1.3, 1.4).
RESUMABLE_CHANGES = (
    "run.", "ray.", "storage.", "runs",  # runs: the story `dml run` walks, not what one run trains
    "data.root", "data.loader_workers", "data.eval_batch_size",
    "loss.tile_size", "loss.tiled_above", "loss.pc.old_embeddings",
    "train.steps", "train.checkpoint_every", "train.keep_best", "train.log_every", "train.grad_cache_chunk",
)

_ABSENT = "<absent>"


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field path, saved value, new value) for every field that differs and is not resumable.

    A field missing from `saved` (written before the field existed) is compared as its default."""
    return _differences(_with_defaults(saved, Config().to_dict()), new, "")


def check_resume_config(cfg: Config) -> None:
    """Raise `ConfigError` if `cfg` would resume a checkpoint of `cfg.run_dir` trained under other settings."""
    saved_url = storage.join(cfg.run_dir, "config.yaml")
    if cfg.run.allow_config_change or cfg.run.fresh_start:
        return
    if not _has_checkpoint(cfg.run_dir) or not storage.exists(saved_url):
        return
    saved = yaml.safe_load(storage.read_bytes(saved_url)) or {}
    changes = config_changes(saved, cfg.to_dict())
    if changes:
        listed = "\n".join(f"  {path}: saved {old!r}, new {now!r}" for path, old, now in changes)
        raise ConfigError(
            f"run {cfg.run_dir} has checkpoints trained with another config ({saved_url}); resuming would "
            f"change what is trained:\n{listed}\nUse a new run.name or run.fresh_start: true to start afresh, or "
            f"set run.allow_config_change: true to continue this run's checkpoint under the new values")


def set_aside(run_dir: str, keep: tuple[str, ...] = ()) -> str | None:
    """Move every entry of `run_dir` but `keep` (and earlier set-asides) to `<run_dir>/replaced-<UTC time>/`;
    returns that URL, or None when there was nothing to move."""
    names = [n for n in storage.list_names(run_dir) if n not in keep and not n.startswith("replaced-")]
    if not names:
        return None
    target = storage.join(run_dir, f"replaced-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}")
    for name in names:
        storage.move(storage.join(run_dir, name), storage.join(target, name))
    return target


def _resumable(path: str) -> bool:
    return any(path == f or (f.endswith(".") and path.startswith(f)) for f in RESUMABLE_CHANGES)


def _with_defaults(saved: dict, defaults: dict) -> dict:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def _differences(saved: dict, new: dict, prefix: str) -> list[tuple[str, object, object]]:
    out = []
    for key in [*saved, *(k for k in new if k not in saved)]:
        path = prefix + str(key)
        if _resumable(path):
            continue
        old, now = saved.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(now, dict):
            out += _differences(old, now, path + ".")
        elif old != now:
            out.append((path, old, now))
    return out


def _has_checkpoint(run_dir: str) -> bool:
    fs, path = storage.filesystem(storage.join(run_dir, CHECKPOINTS))
    return fs.exists(path) and any(p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_") for p in fs.ls(path))

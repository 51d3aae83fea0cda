"""One Prefect flow per stage (shard, train, evaluate, backfill), each from a config file and `--set` items,
and the stage steps the retrain flow composes. Each returns plain JSON-able dicts; flow runs are named after
the training run (`run.name`)."""
from __future__ import annotations

from prefect import flow

from dml_core import storage
from dml_core.config import Config, load_config, parse_overrides
from dml_core.data.layout import MANIFEST_FILE
from dml_core.gallery.gallery_model import current_serving, resolve_gallery_checkpoints
from dml_core.gallery.registry import ModelRef
from tasks.ray_runtime import ray_session
from tasks.shard import with_version
from tasks.workflow import (backfill_task, evaluate_task, partial_backfill_task, run_cached, shard_task, train_task,
                            transform_task)


def load(config: str, overrides: list[str] | None = None) -> Config:
    """The config with its `--set` items, its storage configured. A scheduled run of a deployment (`dml serve`) trains a run of its
    own, `run.name` plus the scheduled minute, rather than resuming the previous tick's finished run."""
    from prefect.runtime import deployment, flow_run

    cfg = load_config(config, parse_overrides(overrides))
    storage.configure(cfg.storage)  # before the first storage access: the dataset version, the registry
    if deployment.id is not None and flow_run.id is not None:
        cfg.run.name = f"{cfg.run.name}-{flow_run.scheduled_start_time:%Y%m%d-%H%M}"
    return cfg


def run_name() -> str:
    """The flow run's name: the config's `run.name` (the flow itself reports a bad config)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        return load(params["config"], params.get("overrides")).run.name
    except Exception:  # noqa: BLE001 - naming must not hide the flow's own, clearer error
        return "invalid-config"


def shard_step(cfg: Config) -> dict:
    """{"dataset", "version", "url", "resharded"}; a cached result is a dataset reused, never resharded."""
    out, cached = run_cached(shard_task, lambda r: storage.exists(storage.join(r["url"], MANIFEST_FILE)), cfg=cfg)
    return {**out, "resharded": out["resharded"] and not cached}


def train_step(cfg: Config) -> dict:
    """Train (BCT against, or starting from, the registry's gallery model when the config says `gallery`)."""
    cfg = resolve_gallery_checkpoints(cfg)
    out, _ = run_cached(train_task, lambda r: bool(r["checkpoint"]) and storage.exists(r["checkpoint"]), cfg=cfg)
    return out


def evaluate_step(cfg: Config, checkpoint: str, old: ModelRef | None, served: ModelRef | None = None,
                  transformation=None) -> dict:
    out, _ = run_cached(evaluate_task, lambda r: storage.exists(r["files"]["summary"]), cfg=cfg,
                        checkpoint=checkpoint, old=old, served=served, transformation=transformation)
    return out


def newest_checkpoint(cfg: Config) -> str:
    from tasks.train import newest_checkpoint_url

    url = newest_checkpoint_url(cfg.run_dir)
    if url is None:
        raise FileNotFoundError(f"run {cfg.run.name} has no checkpoint under {cfg.run_dir}/checkpoints; train it "
                                f"first or pass a checkpoint")
    return url


@flow(name="shard", flow_run_name=run_name)
def shard_flow(config: str, overrides: list[str] | None = None) -> dict:
    """Shard `data.source` into a versioned dataset (nothing written when that version exists)."""
    out = shard_step(load(config, overrides))
    return {k: out[k] for k in ("dataset", "version", "url", "resharded")}


@flow(name="train", flow_run_name=run_name)
def train_flow(config: str, overrides: list[str] | None = None) -> dict:
    """Train the run on the dataset its source shards to (or `data.version`); resumes its checkpoints."""
    with ray_session():
        return train_step(with_version(load(config, overrides)))


@flow(name="evaluate", flow_run_name=run_name)
def evaluate_flow(config: str, overrides: list[str] | None = None, checkpoint: str | None = None,
                  old: str | None = None) -> dict:
    """Evaluate a checkpoint (default the run's newest) against what the registry serves, or against the
    checkpoint `old`: the summary row, its verdict the gate's (nothing is served)."""
    cfg = with_version(load(config, overrides))
    if old is None:
        old_model, served = current_serving(cfg)
    else:
        old_model, served = ModelRef(version=run_of(old), checkpoint=old), None
    return evaluate_step(cfg, checkpoint or newest_checkpoint(cfg), old_model, served)["summary"]


def run_of(checkpoint: str) -> str:
    """The run a checkpoint URL belongs to (`.../runs/<run>/checkpoints/<ckpt>`), else the folder's name."""
    parts = checkpoint.rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]


@flow(name="backfill", flow_run_name=run_name)
def backfill_flow(config: str, overrides: list[str] | None = None, checkpoint: str | None = None,
                  budget: float | None = None) -> dict:
    """Embed and index the gallery with a checkpoint (default the run's newest) and switch the registry to it,
    whatever the gate would say; with a `budget`, re-embed that share of the served transformed gallery with its
    query model instead (FastFill order, `backfill.order`), swapping indexes as it goes."""
    cfg = with_version(load(config, overrides))
    with ray_session():
        if budget is not None:
            cfg.backfill.budget = budget
            return partial_backfill_task(cfg)
        return backfill_task(cfg, checkpoint or newest_checkpoint(cfg))


@flow(name="transform", flow_run_name=run_name)
def transform_flow(config: str, overrides: list[str] | None = None, checkpoint: str | None = None) -> dict:
    """Train h from the gallery model to a checkpoint's model (default the run's newest), map the stored gallery
    through it (no image read), index it and switch the registry to it, whatever the gate would say."""
    cfg = with_version(load(config, overrides))
    with ray_session():
        return transform_task(cfg, checkpoint or newest_checkpoint(cfg))

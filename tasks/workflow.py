"""The stages as Prefect tasks: I/O retried with exponential backoff (never an error that would recur); shard, train and evaluate cached on
content (dataset fingerprint, config hash, checkpoint hashes), never on tensors. A cached result whose
outputs have gone from storage is recomputed (`run_cached`)."""
from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.tasks import exponential_backoff

from dml_core import storage
from dml_core.storage import StorageFullError
from dml_core.config import Config, ConfigError
from dml_core.data.manifest import ManifestError
from dml_core.data.sources.base import sha256_file, sha256_json
from dml_core.gallery.gallery_model import gallery_name
from dml_core.gallery.registry import GalleryEntry, ModelRef, Registry
from dml_core.metrics.gate import GateDecision
from dml_core.training.embed import model_url
from tasks import evaluate, events, publish, shard



def would_recur(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a failed stage unless its error would come back (a bad config or
    dataset, a checkpoint file that does not load, a full disk, a training run stopped for such an error, a run
    another driver holds)."""
    from dml_core.models.checkpoint import CheckpointError
    from dml_core.training.lease import LeaseHeldError
    from tasks.train import TrainingError

    return not isinstance(state.data, (ConfigError, ManifestError, CheckpointError, StorageFullError, TrainingError,
                                       LeaseHeldError))


IO_RETRIES = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
              "retry_jitter_factor": 0.5, "retry_condition_fn": would_recur}


def checkpoint_hash(checkpoint: str) -> str:
    """sha256 of a checkpoint's model file (its weights and spec: what embeds)."""
    fs, path = storage.filesystem(model_url(checkpoint))
    return sha256_file(fs, path)


def _shard_key(_, params: dict) -> str:
    cfg = params["cfg"]
    return "shard-" + sha256_json([cfg.data_root, cfg.data.dataset, shard.dataset_fingerprint_of(cfg)])


def _train_key(_, params: dict) -> str:
    cfg: Config = params["cfg"]
    inputs = [cfg.loss.bct.old_checkpoint if cfg.loss.bct is not None else "", cfg.train.init_checkpoint]
    return "train-" + sha256_json([cfg.to_dict(), *(checkpoint_hash(c) if c else None for c in inputs)])


def _evaluate_key(_, params: dict) -> str:
    cfg: Config = params["cfg"]
    h = params.get("transformation")
    models = [params["old"], params.get("served"), h and h.model]
    return "evaluate-" + sha256_json([evaluate.evaluation_dir(cfg), cfg.data.dataset, cfg.data.version,
                                      checkpoint_hash(params["checkpoint"]), params.get("version"),
                                      *(m and [m.version, checkpoint_hash(m.checkpoint)] for m in models),
                                      h and h.side_info, cfg.gate.__dict__, cfg.data.on_error])


def _train(cfg: Config) -> dict:
    from tasks.train import run_training

    result = run_training(cfg)
    return {"run": cfg.run.name, "run_dir": result.run_dir, "checkpoint": result.checkpoint,
            "steps": int(result.final.get("step", 0)), "loss": result.metrics.get("loss_avg"),
            "skipped": result.skipped}


def _transformation(cfg: Config, checkpoint: str):
    """h from the registry's gallery model to the new model (`tasks.transform`) when `backfill.transformation`
    is set and the gallery is a plain one; else None (no transformed option for the gate)."""
    from tasks.transform import run_transformation_training

    entry = Registry(cfg.run.root).gallery(gallery_name(cfg))
    if cfg.backfill.transformation is None or entry is None:
        return None
    if entry.transformation is not None:
        print(f"[transformation] gallery {gallery_name(cfg)} is served transformed by {entry.transformation.version}: "
              f"h is not chained, so the gate chooses between the query model and a full backfill", flush=True)
        return None
    return run_transformation_training(cfg, checkpoint, entry)


def _update(cfg: Config, checkpoint: str, gate: dict, old: ModelRef | None, served: ModelRef | None = None,
            transformation=None) -> dict:
    """Serve the new model as the evaluation's gate decided against `old` (and `served`): rejected (nothing
    changes), query model only, the gallery transformed by `transformation` (then re-embedded in order up to
    `backfill.budget`), or backfill, index and switch; events bracket the backfill and announce the registry
    change."""
    from tasks.update import run_update

    gallery, regated = gallery_name(cfg), []

    def decide(current: GalleryEntry | None) -> GateDecision:
        now = (None, None) if current is None else (current.gallery_model, current.query_model)
        if now[0] == old and (served is None or now[1] == served):
            return GateDecision.from_dict(gate)
        from dml_core.data.manifest import Manifest
        from tasks.update import gate_decision

        regated.append(f"another run changed the registry while this one was evaluated: gated again against "
                       f"gallery model {now[0] and now[0].version}, query model {now[1] and now[1].version}")
        print(f"[update] gallery {gallery}: {regated[-1]}", flush=True)
        manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
        return gate_decision(cfg, manifest, current, checkpoint, transformation if now[0] == old else None)

    result = run_update(cfg, checkpoint, decide=decide, transformation=transformation,
                        on_backfill=lambda stage, m: events.emit_backfill(stage, gallery, m, cfg.run.name))
    if result.action != "rejected":
        events.emit_switched(gallery, result.action, result.entry, cfg.run.name)
    entry = result.entry
    if result.action == "transformed" and cfg.backfill.budget > 0:
        _partial_backfill(cfg)
        entry = Registry(cfg.run.root).gallery(gallery)
    return {"gallery": gallery, "action": result.action, "backfill": result.backfilled,
            "gallery_model": entry and entry.gallery_model.version, "query_model": entry and entry.query_model.version,
            "index": entry and entry.index, "reembedded": entry and entry.reembedded,
            # when gated again: what against and why (the evaluation's own reasons are about what it compared with)
            "compared_with": result.old_model and result.old_model.version,
            "reasons": [regated[-1], *result.decision.reasons()] if regated else None}


def _backfill(cfg: Config, checkpoint: str) -> dict:
    """Backfill and index the gallery with `checkpoint` (model `run.name`) and switch the registry to it."""
    from dml_core.gallery.update import check_index
    from tasks.update import backfill_and_index

    gallery, model = gallery_name(cfg), ModelRef(cfg.run.name, checkpoint)
    events.emit_backfill("started", gallery, model, cfg.run.name)
    embeddings, index = backfill_and_index(cfg, model)
    events.emit_backfill("finished", gallery, model, cfg.run.name)
    entry = Registry(cfg.run.root, check_index=check_index).switch(gallery, model, embeddings, index,
                                                                   "backfilled on request (backfill flow)")
    events.emit_switched(gallery, "switch", entry, cfg.run.name)
    return {"gallery": gallery, "model_version": model.version, "checkpoint": checkpoint, "embeddings": embeddings,
            "index": index}


def _transform(cfg: Config, checkpoint: str) -> dict:
    """Train h from the gallery model to `checkpoint`'s model (model `run.name`), map the gallery through it,
    index it and switch the registry to it, whatever the gate would say (`backfill.transformation`, or its
    defaults when the config has none)."""
    import copy

    from dml_core.config import TransformationSection
    from dml_core.gallery.registry import Registry, RegistryError
    from dml_core.gallery.update import check_index
    from tasks.transform import run_transformation_training, transform_gallery

    gallery, model = gallery_name(cfg), ModelRef(cfg.run.name, checkpoint)
    registry = Registry(cfg.run.root, check_index=check_index)
    entry = registry.gallery(gallery)
    if entry is None:
        raise RegistryError(f"gallery {gallery!r} has no model in {registry.url}: backfill it before transforming it")
    if cfg.backfill.transformation is None:
        cfg = copy.deepcopy(cfg)
        cfg.backfill.transformation = TransformationSection()
    h = run_transformation_training(cfg, checkpoint, entry)
    embeddings, index = transform_gallery(cfg, entry, h.model, model)
    entry = registry.transformed(gallery, model, h.model, embeddings, index,
                                 f"transformed on request (transform flow): h {h.model.version}, training mse "
                                 f"{h.metrics.get('mse', float('nan')):.4g}")
    events.emit_switched(gallery, "transformed", entry, cfg.run.name)
    return {"gallery": gallery, "model_version": model.version, "transformation": h.model.version,
            "side_info": h.side_info, "mse": h.metrics.get("mse"), "embeddings": embeddings, "index": index}


def _partial_backfill(cfg: Config) -> dict:
    """Re-embed the transformed gallery in `backfill.order` up to `backfill.budget`, swapping indexes as it goes."""
    from tasks.partial_backfill import run_partial_backfill

    out = run_partial_backfill(cfg)
    entry = Registry(cfg.run.root).gallery(gallery_name(cfg))
    events.emit_switched(gallery_name(cfg), "reembedded", entry, cfg.run.name)
    return out


shard_task = task(shard.run_shard, name="shard", cache_key_fn=_shard_key, persist_result=True, **IO_RETRIES)
train_task = task(_train, name="train", cache_key_fn=_train_key, persist_result=True, retries=1,
                  retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=would_recur)
evaluate_task = task(evaluate.run_evaluation, name="evaluate", cache_key_fn=_evaluate_key, persist_result=True,
                     **IO_RETRIES)
transformation_task = task(_transformation, name="transformation", retries=1,
                           retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=would_recur)
update_task = task(_update, name="update", retries=1, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                   retry_condition_fn=would_recur)
backfill_task = task(_backfill, name="backfill", retries=1, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                     retry_condition_fn=would_recur)
transform_task = task(_transform, name="transform", retries=1, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                      retry_condition_fn=would_recur)
partial_backfill_task = task(_partial_backfill, name="partial backfill", retries=1,
                             retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=would_recur)
publish_task = task(publish.publish, name="publish", **IO_RETRIES)


def run_cached(prefect_task, still_there: Callable[[dict], bool], **params) -> tuple[dict, bool]:
    """Run a cached task: (its result, whether it came from the cache). A cached result whose outputs are
    gone (`still_there(result)` false: a deleted dataset or run) is computed again."""
    state = prefect_task(**params, return_state=True)
    out = state.result()
    if state.name != "Cached":
        return out, False
    if still_there(out):
        return out, True
    return prefect_task.with_options(refresh_cache=True)(**params), False

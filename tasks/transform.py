"""The transformation stage on Ray (FCT / FastFill, METHODS 6.1): train h from the gallery model's (and the
side-info model's) embeddings of the training split to the new model's, as a Ray Train job; then map the
stored gallery through h with the backfill's actors (no image read), build and check its index.

h of run `<name>` against gallery model `<old>` lives in `<run dir>/transformation/<old>/` (checkpoints,
`training_data.npz`); the frozen models' embeddings come from the content-keyed cache
(`dml_core.training.embedding_cache`), so a rerun embeds nothing again, and training resumes from h's newest
checkpoint like any run.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from dml_core import storage
from dml_core.config import Config, ConfigError, config_from_dict
from dml_core.data.manifest import Manifest
from dml_core.gallery.embeddings import MANIFEST_FILE, load_gallery, pending, read_manifest, write_manifest
from dml_core.gallery.registry import GalleryEntry, ModelRef
from dml_core.gallery.transform import source_tasks, transformed_url
from dml_core.training.embedding_cache import cached_embeddings
from dml_core.training.lease import RunLease
from dml_core.training.state import checkpoint_metrics
from dml_core.training.transformation import TRAINING_DATA, TransformationData, fit_transformation
from tasks.backfill import EmbedPool, model_key, run_on_pool
from tasks.train import fit_on_ray, newest_checkpoint_url, run_worker, worker_context

TRANSFORMATION = "transformation"


@dataclass
class TrainedTransformation:
    model: ModelRef  # h: version `<new>-from-<old>`, its checkpoint
    side_info: str | None  # the side-info model h reads beside the old embedding (None: none)
    metrics: dict  # h's final checkpoint metrics (loss, mse)


def transformation_dir(cfg: Config, old: ModelRef) -> str:
    return storage.join(cfg.run_dir, TRANSFORMATION, old.version)


def gallery_side_info(entry: GalleryEntry) -> str | None:
    """The side-info model whose embeddings the gallery stores beside its own (None: none stored)."""
    return read_manifest(entry.embeddings.rsplit("/", 1)[0]).get("side_info")


def training_data(cfg: Config, manifest: Manifest, checkpoint: str, old: ModelRef, side: str | None) -> str:
    """Write h's training data (old, new, side embeddings of the training split, from the cache); its URL."""
    new = cached_embeddings(cfg, checkpoint, manifest)
    others = {name: cached_embeddings(cfg, c, manifest) for name, c in (("old", old.checkpoint), ("side", side)) if c}
    for name, emb in others.items():
        if not np.array_equal(emb.ids.numpy(), new.ids.numpy()):
            raise RuntimeError(f"the {name} and new model embedded different items of {manifest.url} (train split)")
    url = storage.join(transformation_dir(cfg, old), TRAINING_DATA)
    side_z = others["side"].z if side else None
    TransformationData(others["old"].z, new.z, new.labels, side_z).save(url)
    return url


def transformation_worker(loop_config: dict) -> dict:
    """Ray Train entry point of h's training on every worker."""
    cfg = config_from_dict(loop_config["config"])
    worker = worker_context(cfg, loop_config)
    data = TransformationData.load(loop_config["data"])
    return run_worker(loop_config, lambda: fit_transformation(cfg.backfill.transformation, data, loop_config["dir"],
                                                              worker, cfg.train.seed, loop_config["config"]))


def run_transformation_training(cfg: Config, checkpoint: str, entry: GalleryEntry) -> TrainedTransformation:
    """Train h from `entry`'s gallery model (with the side-info its gallery stores, if any) to the model of
    `checkpoint` on Ray, resuming h's newest checkpoint; refused while another driver trains the same h."""
    if cfg.backfill.transformation is None:
        raise ConfigError("backfill.transformation is not set: there is no transformation to train")
    if entry.transformation is not None:
        raise ConfigError(f"the gallery is already a transformed one (by {entry.transformation.version}); chains "
                          f"of transformations are not built: backfill it fully first")
    storage.configure(cfg.storage)
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    old, side = entry.gallery_model, gallery_side_info(entry)
    out = transformation_dir(cfg, old)
    with RunLease.acquire(out, cfg.run.lease_seconds):
        data = training_data(cfg, manifest, checkpoint, old, side)
        fit_on_ray(cfg, transformation_worker, {"config": cfg.to_dict(), "data": data, "dir": out}, cfg.run_dir)
    h = newest_checkpoint_url(out)
    return TrainedTransformation(ModelRef(f"{cfg.run.name}-from-{old.version}", h), side, checkpoint_metrics(h))


def transform_gallery(cfg: Config, entry: GalleryEntry, h: ModelRef, model: ModelRef,
                      pool: EmbedPool | None = None, on_shard=None) -> tuple[str, str]:
    """Map every stored shard of `entry`'s gallery through h with `ray.num_workers` actors into the gallery
    version of `model` (`<version>-transformed`), resuming what a killed run left; then build its index.
    Returns (gallery manifest URL, index manifest URL)."""
    from dml_core.gallery.index import IndexSpec, build_index

    source = entry.embeddings.rsplit("/", 1)[0]
    src_manifest = read_manifest(source)
    out = transformed_url(cfg.run.root, src_manifest["gallery"], model.version)
    tasks = source_tasks(source)
    shas = [s["sha256"] for s in src_manifest["shards"]]
    todo = pending(out, tasks)
    if todo:
        options = {"dtype": cfg.backfill.dtype, "attempt": uuid.uuid4().hex}
        key = model_key(h.checkpoint)
        run_on_pool(cfg, pool, lambda a, t: a.transform.remote(t, key, out, {**options, "sha256": shas[t.index]}),
                    todo, len(tasks), on_shard, label="transform")
    meta = {"gallery": src_manifest["gallery"], "model_version": model.version, "checkpoint": model.checkpoint,
            "transformed_from": source, "transformation": h.checkpoint, "side_info": src_manifest.get("side_info"),
            "dataset": src_manifest["dataset"]}
    write_manifest(out, tasks, meta)
    gallery = load_gallery(out)
    index = build_index(gallery.z, gallery.ids, IndexSpec(factory=cfg.backfill.index))
    return storage.join(out, MANIFEST_FILE), index.save(out)

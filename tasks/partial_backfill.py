"""The ordered partial backfill on Ray (FastFill, METHODS 6.1): re-embed a share of the registered transformed
gallery with its query model, step by step, with the backfill's actors; each step is indexed, checked and
then registered (`dml_core.gallery.partial_backfill`).

A step's ids are grouped by the dataset shard that holds them (shard i of the gallery split is stored in
record i of the old gallery, and so of the transformed one); each actor reads one shard and puts only the
wanted items through the model. The driver holds a lease on the gallery's `reembed/` folder: one writer.
"""
from __future__ import annotations

import uuid

import numpy as np

from dml_core import storage
from dml_core.config import Config, ConfigError
from dml_core.data.manifest import Manifest
from dml_core.gallery.embeddings import ShardTask, load_arrays, read_manifest, shard_tasks
from dml_core.gallery.gallery_model import gallery_name
from dml_core.gallery.index import IndexSpec
from dml_core.gallery.partial_backfill import Step, partial_backfill, reembed_dir
from dml_core.gallery.registry import GalleryEntry, Registry, RegistryError
from dml_core.gallery.update import check_index
from dml_core.training.lease import RunLease
from tasks.backfill import EmbedPool, model_key, run_on_pool


def run_partial_backfill(cfg: Config, budget: float | None = None, order: str | None = None,
                         pool: EmbedPool | None = None, on_step=None) -> dict:
    """Re-embed `budget` (default `backfill.budget`) of the config's registered transformed gallery with its
    query model in `order` (default `backfill.order`), `backfill.step_fraction` per index swap, with
    `ray.num_workers` actors (the `pool`'s, else new ones); resumes what a killed run left.
    `on_step(k, fraction)` (driver side) sees each step registered. Returns the summary of the steps."""
    storage.configure(cfg.storage)
    bf, name = cfg.backfill, gallery_name(cfg)
    registry = Registry(cfg.run.root, check_index=check_index)
    entry = _transformed_entry(registry, name)
    gallery_dir = entry.embeddings.rsplit("/", 1)[0]
    tasks = _dataset_shards(cfg, gallery_dir)
    embed = _StepEmbedder(cfg, entry, gallery_dir, tasks)
    own, pool = pool is None, pool or EmbedPool(cfg)
    try:
        with RunLease.acquire(reembed_dir(gallery_dir), cfg.run.lease_seconds):
            result = partial_backfill(
                gallery_dir, lambda step, ids: embed(pool, step, ids), registry, name,
                budget=bf.budget if budget is None else budget, step_fraction=bf.step_fraction,
                order=order or bf.order, seed=cfg.train.seed, index_spec=IndexSpec(factory=bf.index),
                dtype=bf.dtype, on_step=lambda k, f: _report(k, f, on_step), attempt=uuid.uuid4().hex)
    finally:
        if own:
            pool.close()
    return {**result, "name": name, "model": entry.query_model.version}


def _transformed_entry(registry: Registry, name: str) -> GalleryEntry:
    """The registry entry of `name`, which must serve a transformed gallery (partly backfilled or not)."""
    entry = registry.gallery(name)
    if entry is None:
        raise RegistryError(f"gallery {name!r} has no entry in {registry.url}: nothing to backfill partially")
    transformed = "transformed_from" in read_manifest(entry.embeddings.rsplit("/", 1)[0])
    if not transformed or (entry.transformation is None and entry.reembedded is None):
        raise RegistryError(f"gallery {name!r} serves {entry.embeddings}, not a transformed gallery: transform it "
                            f"(backfill.transformation) before a partial backfill")
    return entry


def _dataset_shards(cfg: Config, gallery_dir: str) -> list[ShardTask]:
    """The gallery split's dataset shards, checked to be the ones the transformed gallery's records came from."""
    meta = read_manifest(gallery_dir)
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    wanted = {"name": manifest.name, "version": manifest.version, "split": cfg.backfill.split}
    if meta.get("dataset") != wanted:
        raise ConfigError(f"the transformed gallery {gallery_dir} was made from the dataset {meta.get('dataset')}, "
                          f"the config names {wanted} (data.dataset, data.version, backfill.split)")
    tasks = shard_tasks(manifest, cfg.backfill.split)
    source = [s["shard"] for s in read_manifest(meta["transformed_from"])["shards"]]
    if source != [t.url for t in tasks]:
        raise ConfigError(f"the gallery {meta['transformed_from']} was not embedded shard by shard from the "
                          f"{cfg.backfill.split} split of {manifest.url}")
    return tasks


class _StepEmbedder:
    """Embeds a step's ids with the query model on the pool's actors, one dataset shard per task."""

    def __init__(self, cfg: Config, entry: GalleryEntry, gallery_dir: str, tasks: list[ShardTask]) -> None:
        counts = [s["count"] for s in read_manifest(gallery_dir)["shards"]]
        self.cfg, self.tasks, self.key = cfg, tasks, model_key(entry.query_model.checkpoint)
        self.ids = load_arrays(gallery_dir, "ids")["ids"]
        self.shard_of = np.repeat(np.arange(len(counts)), counts)  # record i holds dataset shard i
        self.sorter = np.argsort(self.ids, kind="stable")
        self.options = {"batch_size": cfg.backfill.batch_size, "on_error": cfg.data.on_error}

    def __call__(self, pool: EmbedPool, step: Step, ids: np.ndarray) -> np.ndarray:
        shards = self.shard_of[self.sorter[np.searchsorted(self.ids, ids, sorter=self.sorter)]]
        todo = [(self.tasks[i], ids[shards == i]) for i in np.unique(shards)]
        got: dict[int, np.ndarray] = {}

        def collect(_n: int, arrays: dict) -> None:
            got.update(zip(arrays["ids"].tolist(), arrays["z"]))

        run_on_pool(self.cfg, pool, lambda a, t: a.embed_items.remote(t[0], self.key, t[1], self.options), todo,
                    len(todo), collect, label=f"partial backfill, step {step.number}")
        return np.stack([got[i] for i in ids.tolist()])


def _report(step: int, fraction: float, on_step) -> None:
    from rich.console import Console

    Console().print(f"[partial backfill] step {step} registered: {fraction:.1%} of the gallery re-embedded")
    if on_step is not None:
        on_step(step, fraction)

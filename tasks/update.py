"""The serving update on Ray: after training, gate the new model against what the registry serves on the
evaluation split; reject it (nothing changes), register it as the query model (no embedding of the gallery),
serve the gallery transformed by h (`tasks.transform`, no image read), or backfill the gallery with it (`tasks.backfill`), build and check its index, and switch the registry
(`dml_core.gallery.update`)."""
from __future__ import annotations

from typing import Callable

from dml_core import storage
from dml_core.config import Config
from dml_core.data.manifest import Manifest
from dml_core.gallery.embeddings import MANIFEST_FILE, load_gallery
from dml_core.gallery.registry import GalleryEntry, ModelRef, Registry
from dml_core.gallery.update import UpdateResult, check_index, update_serving
from dml_core.metrics.evaluate import decide_gate
from dml_core.metrics.gate import GateDecision
from tasks.backfill import run_backfill
from tasks.evaluate import config_floor, config_gate, embed_models, transformed_embeddings
from tasks.transform import TrainedTransformation, transform_gallery


def gate_decision(cfg: Config, manifest: Manifest, current: GalleryEntry | None, checkpoint: str,
                  transformation: TrainedTransformation | None = None) -> GateDecision:
    """METHODS 6 on the evaluation split (leave-one-out): the new model against what `current` serves (its
    gallery model, and its query model in a chain), the gallery transformed by h when given, and the raw-pixel
    floor."""
    old, served = (None, None) if current is None else (current.gallery_model, current.query_model)
    new, old_emb, served_emb = embed_models(cfg, manifest, checkpoint, old, served)
    transformed = transformed_embeddings(cfg, manifest, old_emb, transformation)
    return decide_gate(new.z, new.labels, old_z=None if old_emb is None else old_emb.z,
                       served_z=None if served_emb is None else served_emb.z, transformed_z=transformed,
                       floor=config_floor(cfg, manifest, checkpoint), gate=config_gate(cfg))[1]


def backfill_and_index(cfg: Config, model: ModelRef, on_shard=None) -> tuple[str, str]:
    """Embed the gallery with `model` on Ray and build its index beside it: (gallery manifest, index manifest)."""
    from dml_core.gallery.index import IndexSpec, build_index

    result = run_backfill(cfg, model.checkpoint, model.version, on_shard=on_shard)
    gallery = load_gallery(result.url)
    index = build_index(gallery.z, gallery.ids, IndexSpec(factory=cfg.backfill.index))
    return storage.join(result.url, MANIFEST_FILE), index.save(result.url)


def run_update(cfg: Config, checkpoint: str, version: str | None = None, on_shard=None,
               decide: Callable[[GalleryEntry | None], GateDecision] | None = None,
               on_backfill: Callable[[str, ModelRef], None] | None = None,
               transformation: TrainedTransformation | None = None) -> UpdateResult:
    """Serve the model of `checkpoint` (named `version`, default the run's name) for the config's gallery.
    `decide(current entry or None)` replaces the gate on the evaluation split (`gate_decision`) where the
    caller already has a decision. `on_backfill("started" | "finished", model)` brackets a backfill.
    `transformation` (h) lets the gate choose the gallery transformed by h."""
    storage.configure(cfg.storage)
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    registry = Registry(cfg.run.root, check_index=check_index)
    model = ModelRef(version or cfg.run.name, checkpoint)
    h = transformation
    return update_serving(
        registry, cfg.backfill.gallery or manifest.name, model,
        decide=decide or (lambda current: gate_decision(cfg, manifest, current, checkpoint, h)),
        backfill=lambda m: _bracketed(on_backfill, m, lambda: backfill_and_index(cfg, m, on_shard)),
        transform=None if h is None else lambda m, current: (h.model, *transform_gallery(cfg, current, h.model, m,
                                                                                         on_shard=on_shard)))


def _bracketed(on_backfill, model: ModelRef, backfill):
    if on_backfill is not None:
        on_backfill("started", model)
    out = backfill()
    if on_backfill is not None:
        on_backfill("finished", model)
    return out

"""The serving update after a new model is trained (DESIGN.md, METHODS 6): the gate decides whether the new
model is rejected (the registry is not touched), may query the gallery's existing index (registered as the
query model, no embedding work at all), or the gallery must be backfilled with it, its index built and
checked, and the registry switched to both.

The gate compares the new model with the registry's GALLERY model (the one that embedded the index), not with
the last query model, so a chain of backfill-free updates v1 -> v2 -> v3 checks v3 against v1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dml_core.gallery.embeddings import read_manifest
from dml_core.gallery.registry import GalleryEntry, ModelRef, Registry, RegistryChanged, RegistryError
from dml_core.metrics.gate import GateDecision

# (model) -> (URL of the gallery embeddings' manifest, URL of the checked index's manifest)
Backfill = Callable[[ModelRef], "tuple[str, str]"]
# (model, current entry) -> (h, URL of the transformed gallery's manifest, URL of its checked index's manifest)
Transform = Callable[[ModelRef, GalleryEntry], "tuple[ModelRef, str, str]"]


@dataclass
class UpdateResult:
    # "query_model" (backfill-free), "transformed" (the gallery mapped by h), "switch" (backfilled), "first" (no
    # gallery before) or "rejected" (nothing done)
    action: str
    entry: GalleryEntry | None  # the registry entry now in force (None: a rejected first model)
    old_model: ModelRef | None  # the gallery model the gate compared with
    decision: GateDecision | None

    @property
    def backfilled(self) -> bool:
        return self.action in ("first", "switch")


MAX_DECISIONS = 3  # the gate decides again this often when other writers keep moving the gallery's entry


def update_serving(registry: Registry, gallery: str, model: ModelRef,
                   decide: Callable[[GalleryEntry | None], GateDecision], backfill: Backfill,
                   transform: Transform | None = None) -> UpdateResult:
    """Register `model` for `gallery` as `decide(current entry or None)` (the gate) says: rejected -> nothing
    changes; query model only; the gallery transformed by h (`transform`); otherwise `backfill(model)`, then one
    registry switch. The change is made only against the entry the gate decided on: when another writer moved
    it meanwhile, the gate decides again against the new entry, so no pair it never checked is served."""
    for attempt in range(1, MAX_DECISIONS + 1):
        current = registry.gallery(gallery)
        try:
            return _serve(registry, gallery, model, current, decide(current), backfill, transform)
        except RegistryChanged as e:
            if attempt == MAX_DECISIONS:
                raise
            print(f"[update] {e} (decision {attempt} of at most {MAX_DECISIONS})", flush=True)
    raise AssertionError("unreachable")


def _serve(registry: Registry, gallery: str, model: ModelRef, current: GalleryEntry | None, decision: GateDecision,
           backfill: Backfill, transform: Transform | None) -> UpdateResult:
    """Carry out `decision`, made against `current`; RegistryChanged if the entry moved since."""
    old_model = None if current is None else current.gallery_model
    if decision.rejected:
        return UpdateResult("rejected", current, old_model, decision)
    if current is None:
        embeddings, index = backfill(model)
        entry = registry.switch(gallery, model, embeddings, index, "first model of the gallery: " +
                                "; ".join(decision.reasons()), expected=None)
        return UpdateResult("first", entry, None, decision)
    reason = f"gate against gallery model {current.gallery_model.version}: " + "; ".join(decision.reasons())
    if decision.allowed:
        check_query_model(model, current)
        return UpdateResult("query_model", registry.set_query_model(gallery, model, reason, expected=current),
                            current.gallery_model, decision)
    if decision.transformed:
        if transform is None:
            raise RegistryError(f"the gate chose the transformed gallery for {model.version}, but no transformation "
                                f"was given to the update")
        h, embeddings, index = transform(model, current)
        entry = registry.transformed(gallery, model, h, embeddings, index, reason, expected=current)
        return UpdateResult("transformed", entry, current.gallery_model, decision)
    embeddings, index = backfill(model)
    entry = registry.switch(gallery, model, embeddings, index, reason, expected=current)
    return UpdateResult("switch", entry, current.gallery_model, decision)


def check_index(index: str, embeddings: str, min_recall: float = 0.95) -> None:
    """Raise RegistryError unless `index` (an index manifest URL) loads with every file intact, holds exactly
    the gallery of `embeddings` (a gallery manifest URL) and, if approximate, measured recall >= min_recall."""
    from dml_core.gallery.index import GalleryIndex

    directory, name = index.rsplit("/", 1)
    try:
        loaded = GalleryIndex.load(directory, name.removesuffix(".json"))
        gallery = read_manifest(embeddings.rsplit("/", 1)[0])
    except (OSError, ValueError) as e:
        raise RegistryError(f"index {index} cannot serve: {e}") from e
    if (loaded.count, loaded.dim) != (gallery["count"], gallery["dim"]):
        raise RegistryError(f"index {index} holds {loaded.count} vectors of dimension {loaded.dim}, the gallery "
                            f"{embeddings} {gallery['count']} of dimension {gallery['dim']}")
    recall = loaded.manifest.recall_at_k
    if recall is not None and recall < min_recall:
        raise RegistryError(f"index {index}: measured recall {recall:.4f} < {min_recall}")


def check_query_model(model: ModelRef, entry: GalleryEntry) -> None:
    """Raise RegistryError unless `model` embeds into the dimension of the gallery's index."""
    from dml_core.training.embed import read_model_spec

    dim = int(read_model_spec(model.checkpoint)["embedding_dim"])
    gallery = read_manifest(entry.embeddings.rsplit("/", 1)[0])
    if dim != gallery["dim"]:
        raise RegistryError(f"model {model.version} ({model.checkpoint}) embeds into {dim} dimensions, the index "
                            f"{entry.index} of gallery model {entry.gallery_model.version} holds {gallery['dim']}")

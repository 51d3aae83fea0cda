"""The serving registry, `<root>/registry.json`: for each gallery, the model that embedded it (the gallery
model), its checked index, and the model that serves queries against it (the query model), with history.

A backfill-free update changes only the query model; a backfill switches all three at once; a transformation
(FCT) registers the gallery transformed by h with the new query model (the gallery model stays: h maps its
embeddings), and a partial backfill then swaps in indexes that hold more and more new embeddings. So a chain
v1 -> v2 (compatible) -> v3 keeps v1 as the gallery model, and v3 is checked against v1, not v2 (DESIGN.md).
Every change rewrites the file atomically (one object, never half written) as a compare-and-swap, so several
writers (two retrain runs on one root) never undo each other's changes.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Callable

from dml_core import conditional, storage

REGISTRY_FILE = "registry.json"
FORMAT = 1


class RegistryError(ValueError):
    """The registry file is unreadable, or a change would make it point at something unusable."""


@dataclass(frozen=True)
class ModelRef:
    version: str  # the training run's name
    checkpoint: str  # URL of the checkpoint directory


@dataclass(frozen=True)
class GalleryEntry:
    gallery_model: ModelRef  # embedded the gallery; the old model for BCT and the gate
    query_model: ModelRef  # embeds queries against `index`
    embeddings: str  # URL of the gallery embeddings' manifest
    index: str  # URL of the index manifest
    transformation: ModelRef | None = None  # h: the gallery holds h(gallery model's embeddings) (METHODS 6.1)
    reembedded: float | None = None  # of a transformed gallery, the share re-embedded by the query model since

    @classmethod
    def from_dict(cls, d: dict) -> GalleryEntry:
        h = d.get("transformation")
        return cls(ModelRef(**d["gallery_model"]), ModelRef(**d["query_model"]), d["embeddings"], d["index"],
                   None if h is None else ModelRef(**h), d.get("reembedded"))


ANY = object()  # `expected` of a change that applies whatever the gallery's entry is now
MAX_ATTEMPTS = 200  # lost races before a change gives up: each one is another writer's change landing


class RegistryChanged(RegistryError):
    """The gallery's entry moved after the change was decided: decide again against what is served now."""


def _describe(entry: GalleryEntry | None) -> str:
    if entry is None:
        return "no model"
    h = f", transformed by {entry.transformation.version}" if entry.transformation else ""
    return f"gallery model {entry.gallery_model.version}, query model {entry.query_model.version}{h}"


class Registry:
    """Reads and changes `<root>/registry.json`. `check_index(index_url, embeddings_url)` must raise unless
    the index is complete, checked and built from those embeddings; it guards every switch.

    Every change is a compare-and-swap on the file (`dml_core.conditional`, local disk and S3): a writer that
    lost a race reads again, so no change that returned is undone by another writer. A change given the entry
    it was decided against (`expected`) raises RegistryChanged when the gallery's entry has moved since.
    """

    def __init__(self, root: str, check_index: Callable[[str, str], None] | None = None) -> None:
        self.url = storage.join(root, REGISTRY_FILE)
        self.check_index = check_index

    def _read(self) -> dict:
        return self._parse(conditional.read(self.url))

    def _parse(self, found: conditional.Versioned | None) -> dict:
        if found is None:
            return {"format": FORMAT, "galleries": {}, "history": []}
        try:
            data = json.loads(found.data)
            data.setdefault("history", [])
            for entry in data["galleries"].values():
                GalleryEntry.from_dict(entry)
            return data
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"registry {self.url} is unreadable: {type(e).__name__}: {e}") from e

    def gallery(self, name: str) -> GalleryEntry | None:
        """The gallery's current entry, or None if nothing was registered for it."""
        entry = self._read()["galleries"].get(name)
        return None if entry is None else GalleryEntry.from_dict(entry)

    def galleries(self) -> dict[str, GalleryEntry]:
        return {name: GalleryEntry.from_dict(e) for name, e in self._read()["galleries"].items()}

    def history(self, name: str | None = None) -> list[dict]:
        """Every change, oldest first (of one gallery if `name` is given)."""
        return [h for h in self._read()["history"] if name is None or h["gallery"] == name]

    def switch(self, name: str, model: ModelRef, embeddings: str, index: str, reason: str,
               expected=ANY) -> GalleryEntry:
        """After a backfill: `model` becomes the gallery and the query model, with its embeddings and index."""
        if self.check_index is not None:
            self.check_index(index, embeddings)
        return self._change(name, "switch", reason, expected, lambda _: GalleryEntry(model, model, embeddings, index))

    def set_query_model(self, name: str, model: ModelRef, reason: str, expected=ANY) -> GalleryEntry:
        """A backfill-free update: `model` serves queries against the gallery's existing index."""
        def make(current: GalleryEntry | None) -> GalleryEntry:
            current = self._needed(name, current, "a backfill-free update")
            return GalleryEntry(current.gallery_model, model, current.embeddings, current.index,
                                current.transformation, current.reembedded)
        return self._change(name, "query_model", reason, expected, make)

    def transformed(self, name: str, model: ModelRef, transformation: ModelRef, embeddings: str, index: str,
                    reason: str, expected=ANY) -> GalleryEntry:
        """After a transformation: `model` queries the gallery transformed by h, with its embeddings and index."""
        if self.check_index is not None:
            self.check_index(index, embeddings)

        def make(current: GalleryEntry | None) -> GalleryEntry:
            current = self._needed(name, current, "a transformation")
            return GalleryEntry(current.gallery_model, model, embeddings, index, transformation, 0.0)
        return self._change(name, "transformed", reason, expected, make)

    def reembedded_step(self, name: str, index: str, fraction: float, reason: str, expected=ANY) -> GalleryEntry:
        """A partial backfill's step: `index` holds the transformed gallery with `fraction` of it re-embedded by
        the query model; at 1 the query model becomes the gallery model (the gallery is all its own)."""
        def make(current: GalleryEntry | None) -> GalleryEntry:
            current = self._needed(name, current, "a partial backfill")
            if current.transformation is None:
                raise RegistryError(f"gallery {name!r} is not a transformed gallery: nothing to backfill partially")
            if self.check_index is not None:
                self.check_index(index, current.embeddings)
            whole = fraction >= 1.0
            return GalleryEntry(current.query_model if whole else current.gallery_model, current.query_model,
                                current.embeddings, index, None if whole else current.transformation, fraction)
        return self._change(name, "reembedded", reason, expected, make)

    def _needed(self, name: str, current: GalleryEntry | None, what: str) -> GalleryEntry:
        if current is None:
            raise RegistryError(f"gallery {name!r} has no index in {self.url}: backfill it before {what}")
        return current

    def _change(self, name: str, event: str, reason: str, expected, make) -> GalleryEntry:
        """Compare-and-swap: read the file and its version, check the entry is still `expected`, write
        `make(current entry)` only if the file is still that version; read again after a lost race."""
        for _ in range(MAX_ATTEMPTS):
            found = conditional.read(self.url)
            data = self._parse(found)
            raw = data["galleries"].get(name)
            current = None if raw is None else GalleryEntry.from_dict(raw)
            if expected is not ANY and current != expected:
                raise RegistryChanged(f"gallery {name!r} changed in {self.url} after this {event} was decided: it "
                                      f"was decided against {_describe(expected)}, the registry now has "
                                      f"{_describe(current)}; decide again against what is served now")
            entry = make(current)
            data["galleries"][name] = asdict(entry)
            data["history"].append({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                    "gallery": name, "event": event, "reason": reason, "entry": asdict(entry)})
            blob = json.dumps(data, indent=1).encode()
            if (conditional.create(self.url, blob) if found is None
                    else conditional.replace(self.url, blob, found.token)) is not None:
                return entry
        raise RegistryError(f"{event} of gallery {name!r} lost {MAX_ATTEMPTS} races for {self.url} to other writers")

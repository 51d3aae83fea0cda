"""The serving registry, `<root>/registry.json`: for each gallery, the model that embedded it (the gallery
model), its checked index, and the model that serves queries against it (the query model), with history.

A backfill-free update changes only the query model; a backfill switches all three at once; a transformation
(FCT) registers the gallery transformed by h with the new query model (the gallery model stays: h maps its
embeddings), and a partial backfill then swaps in indexes that hold more and more new embeddings. So a chain
v1 -> v2 (compatible) -> v3 keeps v1 as the gallery model, and v3 is checked against v1, not v2 (DESIGN.md).
Every change rewrites the file atomically (one object, never half written); the registry has one writer at
a time (the retrain flow, which holds its run's lease).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Callable

from dml_core import storage

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


class Registry:
    """Reads and changes `<root>/registry.json`. `check_index(index_url, embeddings_url)` must raise unless
    the index is complete, checked and built from those embeddings; it guards every switch."""

    def __init__(self, root: str, check_index: Callable[[str, str], None] | None = None) -> None:
        self.url = storage.join(root, REGISTRY_FILE)
        self.check_index = check_index

    def _read(self) -> dict:
        if not storage.exists(self.url):
            return {"format": FORMAT, "galleries": {}, "history": []}
        try:
            data = json.loads(storage.read_bytes(self.url))
            for entry in data["galleries"].values():
                GalleryEntry.from_dict(entry)
            return data
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"registry {self.url} is unreadable: {e}") from e

    def gallery(self, name: str) -> GalleryEntry | None:
        """The gallery's current entry, or None if nothing was registered for it."""
        entry = self._read()["galleries"].get(name)
        return None if entry is None else GalleryEntry.from_dict(entry)

    def galleries(self) -> dict[str, GalleryEntry]:
        return {name: GalleryEntry.from_dict(e) for name, e in self._read()["galleries"].items()}

    def history(self, name: str | None = None) -> list[dict]:
        """Every change, oldest first (of one gallery if `name` is given)."""
        return [h for h in self._read()["history"] if name is None or h["gallery"] == name]

    def switch(self, name: str, model: ModelRef, embeddings: str, index: str, reason: str) -> GalleryEntry:
        """After a backfill: `model` becomes the gallery and the query model, with its embeddings and index."""
        if self.check_index is not None:
            self.check_index(index, embeddings)
        return self._write(name, GalleryEntry(model, model, embeddings, index), "switch", reason)

    def set_query_model(self, name: str, model: ModelRef, reason: str) -> GalleryEntry:
        """A backfill-free update: `model` serves queries against the gallery's existing index."""
        current = self._current(name, "a backfill-free update")
        entry = GalleryEntry(current.gallery_model, model, current.embeddings, current.index,
                             current.transformation, current.reembedded)
        return self._write(name, entry, "query_model", reason)

    def transformed(self, name: str, model: ModelRef, transformation: ModelRef, embeddings: str, index: str,
                    reason: str) -> GalleryEntry:
        """After a transformation: `model` queries the gallery transformed by h, with its embeddings and index."""
        current = self._current(name, "a transformation")
        if self.check_index is not None:
            self.check_index(index, embeddings)
        entry = GalleryEntry(current.gallery_model, model, embeddings, index, transformation, 0.0)
        return self._write(name, entry, "transformed", reason)

    def reembedded_step(self, name: str, index: str, fraction: float, reason: str) -> GalleryEntry:
        """A partial backfill's step: `index` holds the transformed gallery with `fraction` of it re-embedded by
        the query model; at 1 the query model becomes the gallery model (the gallery is all its own)."""
        current = self._current(name, "a partial backfill")
        if current.transformation is None:
            raise RegistryError(f"gallery {name!r} is not a transformed gallery: nothing to backfill partially")
        if self.check_index is not None:
            self.check_index(index, current.embeddings)
        whole = fraction >= 1.0
        entry = GalleryEntry(current.query_model if whole else current.gallery_model, current.query_model,
                             current.embeddings, index, None if whole else current.transformation, fraction)
        return self._write(name, entry, "reembedded", reason)

    def _current(self, name: str, what: str) -> GalleryEntry:
        current = self.gallery(name)
        if current is None:
            raise RegistryError(f"gallery {name!r} has no index in {self.url}: backfill it before {what}")
        return current

    def _write(self, name: str, entry: GalleryEntry, event: str, reason: str) -> GalleryEntry:
        data = self._read()
        data["galleries"][name] = asdict(entry)
        data["history"].append({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "gallery": name, "event": event, "reason": reason, "entry": asdict(entry)})
        storage.write_bytes_atomic(self.url, json.dumps(data, indent=1).encode())
        return entry

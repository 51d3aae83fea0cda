"""A gallery served while the registry changes under it (DESIGN.md, "serve").

`ServedGallery` holds one `GalleryQuery` (the query model, index and item labels of one registry entry) as a
single reference. A new entry (a backfill-free update, a transformed gallery, a backfill step, a switch) is
loaded in full beside it and only then swapped in, so every search runs on a query model and an index that
were registered together, and no search waits or fails while a swap happens: one in flight keeps the
snapshot it started with.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from dml_core.data.decode import SampleDecodeError
from dml_core.gallery.query import GalleryQuery, QueryResult
from dml_core.gallery.registry import GalleryEntry, Registry

log = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query that cannot be answered as asked (no image, an undecodable image, k out of range)."""


def single_threaded() -> None:
    """One torch and one FAISS thread in this process: a query's batch is a few images, and two OpenMP threads
    spinning for each other made a single-image search 3-20x slower than one thread on the busy 2-core machine
    (BENCHMARKS.md, "Query service load"); concurrent queries, not one query's threads, use the cores."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def served_by(gallery: str, entry: GalleryEntry) -> dict:
    """What serves a gallery's queries, as reported with every answer and by the health check."""
    h = entry.transformation
    return {"gallery": gallery, "gallery_model": entry.gallery_model.version, "query_model": entry.query_model.version,
            "index": entry.index, "transformation": None if h is None else h.version, "reembedded": entry.reembedded}


def answer(gallery: str, result: QueryResult, images: list[str]) -> dict:
    """The answer to one query, as `dml query --json` prints it and the query service returns it."""
    return {**served_by(gallery, result.entry), "results": result.answers(images)}


class ServedGallery:
    """The registry's current entry of `gallery`, loaded; `refresh()` (or the `follow` thread) swaps in a
    newer entry once it is loaded in full."""

    def __init__(self, registry: Registry, gallery: str, device: str = "cpu") -> None:
        self.registry, self.gallery, self.device = registry, gallery, device
        self.current = GalleryQuery(registry, gallery, device)
        self._refreshing = threading.Lock()

    def search(self, images: list[bytes | str], k: int = 10) -> QueryResult:
        """Top-k gallery items per image, all from one snapshot (the reference is read once)."""
        snapshot = self.current
        if not images:
            raise QueryError("no image to query")
        if not 1 <= k <= snapshot.index.count:
            raise QueryError(f"k={k} must be between 1 and the gallery's size {snapshot.index.count}")
        try:
            return snapshot.search(images, k)
        except SampleDecodeError as e:
            raise QueryError(str(e)) from e

    def health(self) -> dict:
        return served_by(self.gallery, self.current.entry)

    def refresh(self) -> bool:
        """Load the registry's entry if it is not the one served and swap it in; whether it swapped."""
        with self._refreshing:
            entry = self.registry.gallery(self.gallery)
            if entry is None or entry == self.current.entry:
                return False
            self.current = GalleryQuery(self.registry, self.gallery, self.device, entry=entry)
            return True

    def follow(self, interval: float = 2.0, on_swap: Callable[[dict], None] | None = None) -> threading.Event:
        """Refresh every `interval` seconds in a daemon thread until the returned event is set; `on_swap(health)`
        after each swap. An entry that fails to load (storage unreachable) is logged and tried again; the
        current one is served meanwhile."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    if self.refresh() and on_swap is not None:
                        on_swap(self.health())
                except Exception as e:  # keep serving what is loaded; the next poll tries again
                    log.warning("gallery %s: registry entry not loaded, still serving %s: %s: %s", self.gallery,
                                self.current.entry.query_model.version, type(e).__name__, e)

        threading.Thread(target=loop, name=f"follow-{self.gallery}", daemon=True).start()
        return stop

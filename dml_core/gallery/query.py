"""Queries against a served gallery: embed images with the registry's query model, search its index, and
name each neighbour's class (from the manifest of the dataset the gallery was embedded from)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from dml_core import storage
from dml_core.gallery.embeddings import MANIFEST_FILE, load_arrays, read_manifest
from dml_core.gallery.registry import GalleryEntry, Registry, RegistryError


@dataclass
class QueryResult:
    ids: torch.Tensor  # (Nq, k) gallery item ids, nearest first
    labels: torch.Tensor  # (Nq, k) their labels (-1: no item)
    distances: torch.Tensor  # (Nq, k) cosine distances, 1 - cosine similarity
    entry: GalleryEntry  # what served the query
    classes: list[list[str | None]]  # (Nq, k) their class names; None where the dataset names none

    def answers(self, images: list[str]) -> list[dict]:
        """One JSON-ready answer per image, named by `images`: ids, labels, class names, distances."""
        return [{"image": image, "ids": self.ids[i].tolist(), "labels": self.labels[i].tolist(),
                 "classes": self.classes[i], "distances": [round(d, 6) for d in self.distances[i].tolist()]}
                for i, image in enumerate(images)]


def served_entry(registry: Registry, gallery: str) -> GalleryEntry:
    """The registry's entry of `gallery`; RegistryError when nothing serves it."""
    entry = registry.gallery(gallery)
    if entry is None:
        raise RegistryError(f"gallery {gallery!r} is not served: nothing registered in {registry.url}")
    return entry


class ItemLabels:
    """Label and class name of every gallery item, looked up by id (sorted ids, no dict of boxed ints)."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, class_names: list[str] | None) -> None:
        order = np.argsort(ids)
        self.ids, self.labels, self.class_names = ids[order], labels[order], class_names

    @classmethod
    def load(cls, embeddings_url: str) -> ItemLabels:
        """From the gallery embeddings' manifest URL: its ids and labels only, and its dataset's class names."""
        directory = embeddings_url.rsplit("/", 1)[0]
        arrays = load_arrays(directory, "ids", "labels")
        return cls(arrays["ids"], arrays["labels"], dataset_class_names(directory))

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """The label of each id (-1 for an id the gallery does not hold, such as FAISS's -1)."""
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[at] == ids, self.labels[at], -1)

    def name(self, label: int) -> str | None:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else None


def dataset_class_names(gallery_dir: str) -> list[str] | None:
    """The class names of the dataset a gallery was embedded from: a transformed gallery's source is followed
    to the gallery embedded from images, whose shards name the dataset's shard files. None if unknown."""
    meta = read_manifest(gallery_dir)
    while meta.get("transformed_from"):
        meta = read_manifest(meta["transformed_from"])
    shards = meta.get("shards") or []
    if not shards or "/" not in shards[0]["shard"]:
        return None
    from dml_core.data.manifest import Manifest

    folder = shards[0]["shard"].rsplit("/", 1)[0]
    url = storage.join(folder, MANIFEST_FILE)
    if not storage.exists(url):
        return None
    return list(Manifest.from_dict(json.loads(storage.read_bytes(url)), folder).class_names)


class GalleryQuery:
    """One registry entry of a gallery (by default its current one): query model, index and item labels,
    loaded once; `search(images, k)` answers."""

    def __init__(self, registry: Registry, gallery: str, device: str = "cpu",
                 entry: GalleryEntry | None = None) -> None:
        from dml_core.gallery.index import GalleryIndex
        from dml_core.training.embed import load_checkpoint_model

        entry = entry or served_entry(registry, gallery)
        self.gallery, self.entry, self.device = gallery, entry, device
        self.model = load_checkpoint_model(entry.query_model.checkpoint).to(device)
        directory, name = entry.index.rsplit("/", 1)
        self.index = GalleryIndex.load(directory, name.removesuffix(".json"))
        self.items = ItemLabels.load(entry.embeddings)

    @torch.no_grad()
    def search(self, images: list[bytes | str], k: int = 10) -> QueryResult:
        """Top-k gallery items for each image (encoded bytes, or a path or URL to read)."""
        from dml_core.data.decode import decode_image

        spec = self.model.spec
        batch = torch.stack([decode_image(storage.read_bytes(x) if isinstance(x, str) else x, spec.get("image_size"),
                                          spec.get("in_channels"), where=x if isinstance(x, str) else "query image")
                             for x in images])
        z = self.model(batch.to(self.device)).float().cpu()
        found = self.index.search(z, k)
        labels = self.items.labels_of(found.ids.numpy())
        classes = [[self.items.name(label) for label in row] for row in labels.tolist()]
        return QueryResult(found.ids, torch.from_numpy(labels), 1.0 - found.similarities, self.entry, classes)

"""Queries against a served gallery: embed images with the registry's query model, search its index."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dml_core import storage
from dml_core.gallery.embeddings import load_gallery
from dml_core.gallery.registry import GalleryEntry, Registry, RegistryError


@dataclass
class QueryResult:
    ids: torch.Tensor  # (Nq, k) gallery item ids, nearest first
    labels: torch.Tensor  # (Nq, k) their labels
    distances: torch.Tensor  # (Nq, k) cosine distances, 1 - cosine similarity
    entry: GalleryEntry  # what served the query


class GalleryQuery:
    """The registered index and query model of one gallery, loaded once; `search(images, k)` answers."""

    def __init__(self, registry: Registry, gallery: str, device: str = "cpu") -> None:
        from dml_core.gallery.index import GalleryIndex
        from dml_core.training.embed import load_checkpoint_model

        entry = registry.gallery(gallery)
        if entry is None:
            raise RegistryError(f"gallery {gallery!r} is not served: nothing registered in {registry.url}")
        self.entry, self.device = entry, device
        self.model = load_checkpoint_model(entry.query_model.checkpoint).to(device)
        directory, name = entry.index.rsplit("/", 1)
        self.index = GalleryIndex.load(directory, name.removesuffix(".json"))
        gallery_items = load_gallery(entry.embeddings.rsplit("/", 1)[0])
        self.label_of = dict(zip(gallery_items.ids.tolist(), gallery_items.labels.tolist()))

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
        labels = torch.tensor([[self.label_of.get(i, -1) for i in row] for row in found.ids.tolist()])
        return QueryResult(found.ids, labels, 1.0 - found.similarities, self.entry)

"""A served gallery for the query tests: tiny Fashion-MNIST (tests/tasks/_gallery_helpers.py), three models
saved as checkpoints (random linear projections of the pixels: untrained CNNs map every image to nearly one
point, and ranks within 1e-6 of each other would hang on float rounding), v1 and v2 of one dimension, v3 of
another; the gallery embedded and indexed by v1 and by v3 in this process (as tasks.backfill does on Ray),
and query images from the evaluation split. Each test registers into a registry of its own (`registry(root)`:
v1 serves), so the files are built once per module."""
from __future__ import annotations

from dataclasses import dataclass

from dml_core.gallery.registry import GalleryEntry, ModelRef, Registry
from dml_core.gallery.update import check_index


def model_checkpoint(root: str, version: str, dim: int, seed: int) -> str:
    """A random linear projection of 28x28 gray pixels to `dim` (weights drawn with `seed`), as a checkpoint."""
    import torch

    from dml_core import storage
    from dml_core.models.checkpoint import save_model
    from dml_core.models.registry import build_model

    torch.manual_seed(seed)
    url = storage.join(root, "runs", version, "checkpoints", "checkpoint_00000000")
    save_model(build_model("flatten", embedding_dim=dim, in_channels=1, image_size=28, head="linear"),
               storage.join(url, "model.pt"))
    return url


def backfill_in_process(root: str, manifest):
    """`backfill(model) -> (embeddings manifest URL, index manifest URL)`: the gallery split embedded shard by
    shard and indexed (Flat) by the library in this process, with the manifest a backfill writes."""
    from dml_core import storage
    from dml_core.gallery.embeddings import (MANIFEST_FILE, embed_shard, gallery_url, load_gallery, shard_tasks,
                                             write_manifest)
    from dml_core.gallery.index import IndexSpec, build_index
    from dml_core.training.embed import load_checkpoint_model

    def backfill(model: ModelRef) -> tuple[str, str]:
        out, tasks = gallery_url(root, manifest.name, model.version), shard_tasks(manifest)
        net = load_checkpoint_model(model.checkpoint)
        for task in tasks:
            embed_shard(net, task, out, batch_size=16)
        write_manifest(out, tasks, {"gallery": manifest.name, "model_version": model.version,
                                    "checkpoint": model.checkpoint,
                                    "dataset": {"name": manifest.name, "version": manifest.version,
                                                "split": "gallery"}})
        gallery = load_gallery(out)
        index = build_index(gallery.z, gallery.ids, IndexSpec(factory="Flat"))
        return storage.join(out, MANIFEST_FILE), index.save(out)
    return backfill


@dataclass
class ServedFiles:
    root: str  # where the dataset, checkpoints and galleries are
    gallery: str
    manifest: object  # the dataset's Manifest
    models: dict[str, ModelRef]  # v1, v2 (same dimension as v1), v3
    backfills: dict[str, tuple[str, str]]  # v1, v3: (embeddings manifest URL, index manifest URL)
    images: list[str]  # PNG files of query images
    raw_config: dict  # a config of this root (its run.root), as a dict

    def registry(self, root: str) -> Registry:
        """A registry at `root` serving the gallery with v1 (embedded and queried by v1)."""
        registry = Registry(root, check_index=check_index)
        registry.switch(self.gallery, self.models["v1"], *self.backfills["v1"], "test: the first model")
        return registry

    def query_model_update(self, registry: Registry) -> GalleryEntry:
        """A backfill-free update: v2 queries v1's index."""
        return registry.set_query_model(self.gallery, self.models["v2"], "test: a backfill-free update")

    def full_switch(self, registry: Registry) -> GalleryEntry:
        """A backfill: v3 embedded the gallery and queries its own index."""
        return registry.switch(self.gallery, self.models["v3"], *self.backfills["v3"], "test: a backfill")


def build_served_files(tmp) -> ServedFiles:
    """Shard, save the three models, embed and index the gallery with v1 and v3, write three query images."""
    from dml_core.data.shard_stream import iter_shard
    from tests.tasks._gallery_helpers import shard_gallery_dataset

    root = str(tmp / "root")
    manifest = shard_gallery_dataset(root)
    raw = {"run": {"name": "v1", "root": root}, "data": {"dataset": manifest.name}}
    models = {v: ModelRef(v, model_checkpoint(root, v, dim, seed)) for v, dim, seed in
              (("v1", 16, 0), ("v2", 16, 1), ("v3", 24, 2))}
    backfills = {v: backfill_in_process(root, manifest)(models[v]) for v in ("v1", "v3")}
    images = []
    for n, sample in enumerate(list(iter_shard(manifest.shard_urls("eval")[0]))[:3]):
        images.append(str(tmp / f"query{n}.png"))
        with open(images[-1], "wb") as f:
            f.write(sample["png"])
    return ServedFiles(root, manifest.name, manifest, models, backfills, images, raw)

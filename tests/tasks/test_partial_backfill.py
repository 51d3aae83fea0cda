"""The ordered partial backfill on Ray, end to end on tiny data: v1's gallery backfilled and registered, mapped
by a random FastFill h into v2's space (`transform_gallery`) and registered as transformed, then re-embedded
with v2 in full, step by step, by the actors: the final gallery is v2's own embedding of every item, and the
registry's gallery model became v2."""
import numpy as np
import pytest
import torch

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.gallery.embeddings import MANIFEST_FILE, load_gallery
from dml_core.gallery.index import IndexSpec, build_index
from dml_core.gallery.partial_backfill import gallery_state, plan_steps
from dml_core.gallery.registry import ModelRef, Registry, RegistryError
from dml_core.gallery.update import check_index
from dml_core.models.checkpoint import save_model
from dml_core.models.transformation import Transformation
from dml_core.training.build import build_model_from_config
from dml_core.training.embed import embed_split
from dml_core.training.state import save_state
from tasks.backfill import EmbedPool, run_backfill
from tasks.partial_backfill import run_partial_backfill
from tasks.transform import transform_gallery
from tests.tasks._gallery_helpers import shard_gallery_dataset

pytestmark = pytest.mark.slow


def _checkpoint(cfg, name: str, seed: int) -> ModelRef:
    torch.manual_seed(seed)
    url = storage.join(cfg.run.root, "runs", name, "checkpoints", "checkpoint_00000001")
    save_model(build_model_from_config(cfg), storage.join(url, "model.pt"))
    return ModelRef(name, url)


def test_a_full_budget_partial_backfill_ends_with_the_new_models_gallery(tmp_path):
    import ray

    root = str(tmp_path)
    manifest = shard_gallery_dataset(root)
    cfg = config_from_dict({
        "run": {"name": "v2", "root": root},
        "data": {"dataset": manifest.name, "version": manifest.version, "batch_size": 8, "p": 4, "k": 2},
        "model": {"embedding_dim": 16, "backbone_options": {"widths": [8, 16]}},
        "ray": {"num_workers": 2},
        "backfill": {"batch_size": 16, "budget": 0.5, "step_fraction": 0.3, "order": "uncertainty"}})
    v1, v2 = _checkpoint(cfg, "v1", 0), _checkpoint(cfg, "v2", 1)
    h_dir = storage.join(root, "runs", "v2", "transformation", "v1", "checkpoint_00000001")
    torch.manual_seed(2)
    save_state(h_dir, Transformation(16, 16, branch_width=16, trunk_width=32, uncertainty=True), None, None, None,
               0, {})
    h = ModelRef("v2-from-v1", h_dir)
    registry = Registry(root, check_index=check_index)
    ray.shutdown()
    try:
        with EmbedPool(cfg) as pool:
            with pytest.raises(RegistryError, match="no entry"):
                run_partial_backfill(cfg, pool=pool)
            first = run_backfill(cfg, v1.checkpoint, v1.version, pool=pool)
            g = load_gallery(first.url)
            index = build_index(g.z, g.ids, IndexSpec()).save(first.url)
            entry = registry.switch(manifest.name, v1, storage.join(first.url, MANIFEST_FILE), index, "first")
            with pytest.raises(RegistryError, match="not a transformed gallery"):
                run_partial_backfill(cfg, pool=pool)
            embeddings, index = transform_gallery(cfg, entry, h, v2, pool=pool)
            registry.transformed(manifest.name, v2, h, embeddings, index, "transformed by h")
            steps = []
            result = run_partial_backfill(cfg, budget=1.0, pool=pool, on_step=lambda k, f: steps.append((k, f)))
    finally:
        ray.shutdown()
    count = manifest.split("gallery").count
    plan = plan_steps(count, 1.0, 0.3)
    assert result["embedded"] == result["registered"] == list(range(1, len(plan) + 1)) and len(plan) >= 3
    assert steps == [(k, end / count) for k, (_, end) in enumerate(plan, start=1)]
    gallery_dir = embeddings.rsplit("/", 1)[0]
    got = gallery_state(gallery_dir, len(plan))
    want = embed_split(v2.checkpoint, manifest, "gallery", batch_size=16)
    assert sorted(got.ids.tolist()) == sorted(want.ids.tolist()) and len(set(got.ids.tolist())) == count
    rows = {item: r for r, item in enumerate(want.ids.tolist())}
    torch.testing.assert_close(got.z, want.z[[rows[i] for i in got.ids.tolist()]], rtol=1e-5, atol=1e-6)
    transformed = gallery_state(gallery_dir, 0)
    assert not torch.allclose(transformed.z, got.z, atol=1e-3)  # h's gallery was another one
    entry = Registry(root).gallery(manifest.name)
    assert entry.gallery_model == entry.query_model == v2 and entry.transformation is None
    assert entry.reembedded == 1.0 and entry.index == storage.join(gallery_dir, f"index-step-{len(plan):06d}.json")
    check_index(entry.index, entry.embeddings)
    assert np.isclose(result["fraction"], 1.0)

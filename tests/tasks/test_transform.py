"""The transformation stage on Ray (METHODS 6.1): h trained by a Ray Train job on the cached embeddings of
the training split (with the side-info the gallery stores), the gallery mapped through h by actors equal to
h applied in one process to the stored vectors, and a transformation killed with SIGKILL mid-way resumed to
the same gallery with no duplicate ids while the registry keeps serving the old one."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.gallery.embeddings import load_arrays, load_gallery
from dml_core.gallery.index import IndexSpec, build_index
from dml_core.gallery.registry import ModelRef, Registry
from dml_core.gallery.update import check_index
from dml_core.models.checkpoint import save_model
from dml_core.models.transformation import load_transformation
from dml_core.training.build import build_model_from_config
from dml_core.training.embedding_cache import cache_url
from dml_core.training.transformation import TransformationData, apply_transformation, transformation_mse
from tasks.backfill import run_backfill
from tasks.transform import run_transformation_training, transform_gallery, transformation_dir
from tests.tasks._gallery_helpers import shard_gallery_dataset

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H = {"branch_width": 32, "trunk_width": 64, "steps": 60, "batch_size": 32, "lr": 3e-3, "checkpoint_every": 30}


def _model(root: str, raw: dict, name: str, seed: int, dim: int) -> str:
    torch.manual_seed(seed)
    cfg = config_from_dict({**raw, "model": {**raw["model"], "embedding_dim": dim}})
    checkpoint = storage.join(root, "runs", name, "checkpoints", "checkpoint_00000001")
    save_model(build_model_from_config(cfg), storage.join(checkpoint, "model.pt"))
    return checkpoint


@pytest.fixture(scope="module")
def served_gallery(tmp_path_factory):
    """A gallery backfilled by a random old model v1 with a side-info model's embeddings stored beside it, and
    registered; a random new model v2 (another width) to transform it to."""
    import ray

    root = str(tmp_path_factory.mktemp("transform"))
    manifest = shard_gallery_dataset(root)
    raw = {"run": {"name": "v2", "root": root},
           "data": {"dataset": manifest.name, "version": manifest.version, "batch_size": 8, "p": 4, "k": 2},
           "model": {"embedding_dim": 16, "backbone_options": {"widths": [8, 16]}}, "ray": {"num_workers": 2},
           "backfill": {"batch_size": 16, "transformation": H}}
    old, new, side = (_model(root, raw, n, s, d) for n, s, d in (("v1", 1, 16), ("v2", 2, 24), ("side", 3, 8)))
    ray.shutdown()
    cfg = config_from_dict({**raw, "backfill": {**raw["backfill"], "side_info": side}})
    result = run_backfill(cfg, old, "v1")
    registry = Registry(root, check_index=check_index)
    gallery = load_gallery(result.url)
    index = build_index(gallery.z, gallery.ids, IndexSpec()).save(result.url)
    entry = registry.switch(manifest.name, ModelRef("v1", old), storage.join(result.url, "manifest.json"), index,
                            "test set-up")
    yield raw, manifest, entry, new, side
    ray.shutdown()


def test_h_trains_on_ray_and_the_gallery_is_mapped_exactly(served_gallery):
    raw, manifest, entry, new, side = served_gallery
    cfg = config_from_dict(raw)
    h = run_transformation_training(cfg, new, entry)
    assert h.side_info == side and h.metrics["step"] == H["steps"]
    for checkpoint in (entry.gallery_model.checkpoint, new, side):  # each frozen model embedded once, cached
        assert storage.exists(cache_url(cfg.run.root, checkpoint, manifest, "train"))
    data = TransformationData.load(storage.join(transformation_dir(cfg, entry.gallery_model), "training_data.npz"))
    assert data.side is not None and data.side.shape[1] == 8 and data.new.shape[1] == 24
    model = load_transformation(h.model.checkpoint)
    baseline = float(data.new.pow(2).sum(1).mean())  # predicting 0: h learned something of the map
    mse = transformation_mse(model, data)
    assert mse == pytest.approx(h.metrics["mse"], rel=1e-4) and mse < 0.5 * baseline, (mse, baseline)
    again = run_transformation_training(cfg, new, entry)  # resumed from its last checkpoint: nothing to train
    assert again.model == h.model and again.metrics == h.metrics

    embeddings, index = transform_gallery(cfg, entry, h.model, ModelRef("v2", new))
    stored = load_arrays(entry.embeddings.rsplit("/", 1)[0], "z", "ids", "side")
    want, log_var = apply_transformation(model, torch.from_numpy(stored["z"]), torch.from_numpy(stored["side"]))
    got = load_arrays(embeddings.rsplit("/", 1)[0], "z", "ids", "log_var")
    assert got["ids"].tolist() == stored["ids"].tolist()
    np.testing.assert_allclose(got["z"], want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["log_var"], log_var.numpy(), rtol=1e-5, atol=1e-6)
    check_index(index, embeddings)


def _driver(raw: dict, entry_url: str, h: str, new: str, kill_after: int) -> str:
    return textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from dml_core.config import config_from_dict
        from dml_core.gallery.registry import ModelRef, Registry
        from tasks.transform import transform_gallery

        def on_shard(n, record):
            if n == {kill_after}:
                os.kill(os.getpid(), signal.SIGKILL)

        cfg = config_from_dict({raw!r})
        entry = Registry(cfg.run.root).gallery({entry_url!r})
        transform_gallery(cfg, entry, ModelRef("h", {h!r}), ModelRef("killed", {new!r}), on_shard=on_shard)
    """)


def test_a_killed_transformation_resumes_to_the_same_gallery(served_gallery, tmp_path):
    raw, manifest, entry, new, _ = served_gallery
    cfg = config_from_dict({**raw, "run": {**raw["run"], "name": "killed"}})
    h = run_transformation_training(cfg, new, entry).model
    script = tmp_path / "driver.py"
    script.write_text(_driver(raw, manifest.name, h.checkpoint, new, kill_after=3))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    registry = Registry(cfg.run.root)
    assert registry.gallery(manifest.name) == entry  # still the old gallery: nothing switched half-way
    out = storage.join(cfg.run.root, "galleries", manifest.name, "killed-transformed")
    done = [n for n in storage.list_names(out) if n.endswith(".done.json")]
    assert 3 <= len(done) < 8 and not storage.exists(storage.join(out, "manifest.json"))
    embeddings, _ = transform_gallery(cfg, entry, h, ModelRef("killed", new))
    reference, _ = transform_gallery(cfg, entry, h, ModelRef("uninterrupted", new))
    got, want = (load_arrays(e.rsplit("/", 1)[0], "z", "ids", "log_var") for e in (embeddings, reference))
    assert len(set(got["ids"].tolist())) == len(got["ids"]) == manifest.split("gallery").count
    for key in ("z", "ids", "log_var"):
        assert np.array_equal(got[key], want[key]), key


def test_the_update_serves_the_transformed_gallery_when_the_gate_says_so(served_gallery):
    """The decision is given (the gate's choice is tested on its formulas in tests/dml_core/metrics): the update
    maps the gallery through h and registers it with v2 as query model; the gallery model stays v1."""
    from dml_core.metrics.gate import ACTIONS, GateDecision
    from tasks.update import run_update

    raw, manifest, entry, new, _ = served_gallery
    cfg = config_from_dict({**raw, "run": {**raw["run"], "name": "served"}})
    h = run_transformation_training(cfg, new, entry)
    given = GateDecision("transformed", ACTIONS["transformed"], "recall_at_1", 1.0, -1.0)
    result = run_update(cfg, new, decide=lambda current: given, transformation=h)
    assert result.action == "transformed" and not result.backfilled
    now = Registry(cfg.run.root).gallery(manifest.name)
    assert (now.gallery_model, now.query_model, now.transformation, now.reembedded) == (
        entry.gallery_model, ModelRef("served", new), h.model, 0.0)
    assert now.embeddings.endswith("served-transformed/manifest.json")
    check_index(now.index, now.embeddings)
    Registry(cfg.run.root).switch(manifest.name, entry.gallery_model, entry.embeddings, entry.index, "test: back")


def test_side_info_from_a_config_is_trained_self_supervised_then_stored(served_gallery, tmp_path):
    """`backfill.side_info` naming a config: the side model is trained through the trainer (once: a second
    backfill reuses it) and its embeddings of the gallery are stored beside the gallery model's."""
    import yaml

    from dml_core.training.embed import embed_split

    raw, manifest, entry, _, _ = served_gallery
    side_raw = {"run": {"name": "side-ssl", "root": raw["run"]["root"]},
                "data": {**raw["data"], "p": None, "k": None, "augment": True},
                "loss": {"objective": "self_supervised"}, "model": {**raw["model"], "embedding_dim": 8},
                "train": {"steps": 10, "checkpoint_every": 10, "log_every": 10}, "ray": {"num_workers": 1}}
    config = tmp_path / "side.yaml"
    config.write_text(yaml.safe_dump(side_raw))
    cfg = config_from_dict({**raw, "run": {**raw["run"], "name": "with-side"},
                            "backfill": {**raw["backfill"], "side_info": str(config)}})
    result = run_backfill(cfg, entry.gallery_model.checkpoint, "with-side")
    side = result.manifest["side_info"]
    assert side.endswith("runs/side-ssl/checkpoints/checkpoint_00000010")
    stored = load_arrays(result.url, "side", "ids")
    want = embed_split(side, manifest, "gallery", batch_size=16)
    assert stored["ids"].tolist() == want.ids.tolist()
    np.testing.assert_allclose(stored["side"], want.z.numpy(), rtol=1e-5, atol=1e-6)
    mtime = os.path.getmtime(storage.join(side, "model.pt"))
    again = run_backfill(cfg, entry.gallery_model.checkpoint, "with-side-again")
    assert again.manifest["side_info"] == side and os.path.getmtime(storage.join(side, "model.pt")) == mtime

"""`dml query` end to end: a registry the library built on tiny Fashion-MNIST (v1 embedded the gallery, v2
serves queries), answered by a real `dml` process; compared with GalleryQuery's own answer and with brute
force over the gallery embeddings."""
import json
import os
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from dml_core.config import config_from_dict
from flows.cli import app
from tests.flows._cli_helpers import REPO, dml_command

pytestmark = pytest.mark.slow


def _checkpoint(cfg, seed: int) -> str:
    import torch

    from dml_core import storage
    from dml_core.models.checkpoint import save_model
    from dml_core.training.build import build_model_from_config

    torch.manual_seed(seed)
    url = storage.join(cfg.run_dir, "checkpoints", "checkpoint_00000000")
    save_model(build_model_from_config(cfg), storage.join(url, "model.pt"))
    return url


def _backfill_in_process(cfg, manifest):
    """The gallery embedded shard by shard and indexed by the library, in this process (tasks.update does the
    same on Ray): the backfill of `update_serving`."""
    from dml_core import storage
    from dml_core.gallery.embeddings import MANIFEST_FILE, embed_shard, gallery_url, shard_tasks, write_manifest
    from dml_core.gallery.embeddings import load_gallery
    from dml_core.gallery.index import IndexSpec, build_index
    from dml_core.training.embed import load_checkpoint_model

    def backfill(model):
        out, tasks = gallery_url(cfg.run.root, manifest.name, model.version), shard_tasks(manifest)
        net = load_checkpoint_model(model.checkpoint)
        for task in tasks:
            embed_shard(net, task, out, batch_size=16)
        write_manifest(out, tasks, {"gallery": manifest.name, "model_version": model.version,
                                    "checkpoint": model.checkpoint})
        gallery = load_gallery(out)
        index = build_index(gallery.z, gallery.ids, IndexSpec(factory="Flat"))
        return storage.join(out, MANIFEST_FILE), index.save(out)
    return backfill


@pytest.fixture(scope="module")
def served_gallery(tmp_path_factory):
    """A registry on tiny Fashion-MNIST: v1 embedded the gallery and v2 (another model, same dimension) serves
    queries; query images as PNG files from the evaluation split; the config of `dml query`."""
    from dml_core.data.shard_stream import iter_shard
    from dml_core.gallery.registry import ModelRef, Registry
    from dml_core.gallery.update import check_index, update_serving
    from dml_core.metrics.gate import UpdateGate
    from tests.tasks._gallery_helpers import shard_gallery_dataset

    tmp = tmp_path_factory.mktemp("query")
    root = str(tmp / "root")
    manifest = shard_gallery_dataset(root)
    raw = {"run": {"name": "v1", "root": root}, "data": {"dataset": manifest.name, "batch_size": 16, "p": 4, "k": 4},
           "model": {"embedding_dim": 16, "backbone_options": {"widths": [8, 16]}}}
    v1 = config_from_dict(raw)
    v2 = config_from_dict({**raw, "run": {"name": "v2", "root": root}})
    registry = Registry(root, check_index=check_index)
    first = UpdateGate().first(1.0)  # the first model of the gallery, given (untrained models are below the floor)
    update_serving(registry, manifest.name, ModelRef("v1", _checkpoint(v1, 0)), decide=lambda current: first,
                   backfill=_backfill_in_process(v1, manifest))
    registry.set_query_model(manifest.name, ModelRef("v2", _checkpoint(v2, 1)), "test: another query model")
    images = []
    for n, sample in enumerate(list(iter_shard(manifest.shard_urls("eval")[0]))[:3]):
        images.append(str(tmp / f"query{n}.png"))
        with open(images[-1], "wb") as f:
            f.write(sample["png"])
    config = tmp / "query.yaml"
    config.write_text(yaml.safe_dump(raw))
    return {"config": str(config), "root": root, "gallery": manifest.name, "images": images}


def _brute_force(served: dict, k: int):
    """Top-k by exact cosine similarity of the query model's embeddings against every gallery embedding."""
    import torch

    from dml_core.data.decode import decode_image
    from dml_core.gallery.embeddings import load_gallery
    from dml_core.gallery.registry import Registry
    from dml_core.training.embed import load_checkpoint_model

    entry = Registry(served["root"]).gallery(served["gallery"])
    gallery = load_gallery(entry.embeddings.rsplit("/", 1)[0])
    model = load_checkpoint_model(entry.query_model.checkpoint)
    with torch.no_grad():
        z = model(torch.stack([decode_image(open(p, "rb").read(), 28, 1) for p in served["images"]]))
    sims = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(gallery.z, dim=1).T
    top = sims.topk(k, dim=1)
    return gallery.ids[top.indices], gallery.labels[top.indices], 1.0 - top.values


def test_dml_query_answers_as_the_gallery_query_and_brute_force(served_gallery):
    import torch

    from dml_core.gallery.query import GalleryQuery
    from dml_core.gallery.registry import Registry

    k, served = 4, served_gallery
    out = subprocess.run(dml_command() + ["query", served["config"], *served["images"], "--k", str(k), "--json"],
                         env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert (answer["gallery"], answer["query_model"]) == (served["gallery"], "v2")
    assert [r["image"] for r in answer["results"]] == served["images"]
    ids = torch.tensor([r["ids"] for r in answer["results"]])
    labels = torch.tensor([r["labels"] for r in answer["results"]])
    distances = torch.tensor([r["distances"] for r in answer["results"]])
    own = GalleryQuery(Registry(served["root"]), served["gallery"]).search(served["images"], k)
    assert torch.equal(ids, own.ids) and torch.equal(labels, own.labels)
    assert torch.allclose(distances, own.distances.float(), atol=1e-5)
    brute_ids, brute_labels, brute_distances = _brute_force(served, k)
    assert torch.equal(ids, brute_ids) and torch.equal(labels, brute_labels)
    assert torch.allclose(distances, brute_distances, atol=1e-4)

    table = CliRunner().invoke(app, ["query", served["config"], served["images"][0], "-k", "2"])
    assert table.exit_code == 0, table.output
    assert "query model v2, gallery model v1" in table.stdout
    rows = [line.split("│")[1:5] for line in table.stdout.splitlines() if line.count("│") == 5]
    assert [[c.strip() for c in r] for r in rows] == [
        [str(rank), str(ids[0, rank - 1].item()), str(labels[0, rank - 1].item()), f"{distances[0, rank - 1]:.4f}"]
        for rank in (1, 2)]


def test_dml_query_errors_are_one_line(served_gallery, tmp_path):
    served, env = served_gallery, {**os.environ, "PYTHONPATH": REPO}
    missing = str(tmp_path / "missing.png")
    out = subprocess.run(dml_command() + ["query", served["config"], served["images"][0], missing], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr == f"dml: error: query image(s) not found: {missing}\n"
    out = subprocess.run(dml_command() + ["query", served["config"], served["images"][0],
                                          "--set", "backfill.gallery=nothing"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "gallery 'nothing' is not served" in out.stderr

"""`dml query` end to end: a registry the library built on tiny Fashion-MNIST (v1 embedded the gallery, v2
serves queries), answered by a real `dml` process; compared with GalleryQuery's own answer and with brute
force over the gallery embeddings."""
import json
import os
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.flows._cli_helpers import REPO, dml_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_gallery(tmp_path_factory):
    """The shared served gallery (tests/dml_core/gallery/_served_gallery.py): v1 embedded it, v2 serves queries;
    the config of `dml query`."""
    from tests.dml_core.gallery._served_gallery import build_served_files

    tmp = tmp_path_factory.mktemp("query")
    files = build_served_files(tmp)
    files.query_model_update(files.registry(files.root))
    config = tmp / "query.yaml"
    config.write_text(yaml.safe_dump(files.raw_config))
    return {"config": str(config), "root": files.root, "gallery": files.gallery, "images": files.images}


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

    from dml_core.data.manifest import Manifest
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
    names = Manifest.read(served["root"], served["gallery"]).class_names
    assert [r["classes"] for r in answer["results"]] == [[names[label] for label in row] for row in labels.tolist()]
    rows = [line.split("│")[1:6] for line in table.stdout.splitlines() if line.count("│") == 6]
    assert [[c.strip() for c in r] for r in rows] == [
        [str(rank), str(ids[0, rank - 1].item()), str(labels[0, rank - 1].item()), names[labels[0, rank - 1]],
         f"{distances[0, rank - 1]:.4f}"] for rank in (1, 2)]


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

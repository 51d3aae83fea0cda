"""The raw-pixel floor (METHODS 6): brute force on the decoded images, cached per dataset version and split,
equal to the evaluation of a model that is an identity on pixels, and an untrained model is flagged below it."""
import json

import numpy as np
import pytest
import torch

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.data.eval_reader import EvalReader
from dml_core.metrics.floor import floor_url, pixel_floor
from dml_core.models.checkpoint import save_model
from dml_core.models.registry import build_model
from tasks.evaluate import run_evaluation


def _brute_force_recall_at_1(manifest, size):
    batches = list(EvalReader.from_manifest(manifest, "eval", rank=0, world_size=1, num_workers=0,
                                              image_size=size, channels=1))
    x = torch.cat([b.images for b in batches]).flatten(1).double().numpy()
    y = torch.cat([b.labels for b in batches]).numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return float((y[s.argmax(1)] == y).mean())


def test_floor_is_brute_force_raw_pixels_and_is_cached(fmnist_shards, tmp_path):
    m = fmnist_shards["manifest"]
    floor = pixel_floor(m, "eval", image_size=20, channels=1, ks=(1,), cache=False)
    assert floor["dim"] == 400 and floor["num_queries"] == m.split("eval").count
    assert floor["recall_at_k"]["1"] == pytest.approx(_brute_force_recall_at_1(m, 20))
    assert not storage.exists(floor_url(m, "eval", 20, 1))
    cached = pixel_floor(m, "eval", image_size=20, channels=1, ks=(1,))
    url = floor_url(m, "eval", 20, 1)
    assert cached == floor and json.loads(storage.read_bytes(url)) == cached
    storage.write_bytes_atomic(url, json.dumps({**cached, "map_at_r": -1.0}).encode())
    assert pixel_floor(m, "eval", image_size=20, channels=1, ks=(1,))["map_at_r"] == -1.0  # read, not recomputed
    assert pixel_floor(m, "eval", image_size=20, channels=1, ks=(1, 5))["map_at_r"] == floor["map_at_r"]  # new K


def _config(shards, tmp_path, name):
    return config_from_dict({"run": {"name": name, "root": str(tmp_path / "runs")},
                             "data": {"root": shards["root"], "dataset": shards["name"], "version": shards["version"],
                                      "eval_batch_size": 64},
                             "gate": {"metric": "map_at_r"}})


def _checkpoint(cfg, model):
    url = storage.join(cfg.run_dir, "checkpoints", "checkpoint_00000000")
    save_model(model, storage.join(url, "model.pt"))
    return url


def test_identity_on_pixels_equals_the_floor_and_untrained_is_flagged(fmnist_shards, tmp_path):
    cfg = _config(fmnist_shards, tmp_path, "pixels")
    identity = build_model("flatten", embedding_dim=28 * 28, in_channels=1, image_size=28, head="linear")
    with torch.no_grad():
        identity.head.proj.weight.copy_(torch.eye(28 * 28))
        identity.head.proj.bias.zero_()
    out = run_evaluation(cfg, _checkpoint(cfg, identity), None)
    m, row = out["metrics"], out["summary"]
    assert m["recall_at_k"] == pytest.approx(m["floor"]["recall_at_k"]) and m["map_at_r"] == pytest.approx(m["floor"]["map_at_r"])
    assert row["verdict"] == "first model" and not row["below_floor"]
    assert (row["floor_recall_at_1"], row["floor_map_at_r"]) == (m["floor"]["recall_at_k"]["1"], m["floor"]["map_at_r"])

    cfg = _config(fmnist_shards, tmp_path, "untrained")
    torch.manual_seed(0)
    untrained = build_model("small_cnn", embedding_dim=32, in_channels=1, image_size=28, widths=[8, 16])
    out = run_evaluation(cfg, _checkpoint(cfg, untrained), None)
    row = out["summary"]
    assert row["map_at_r"] < row["floor_map_at_r"]
    assert row["verdict"] == "rejected" and row["below_floor"] and not row["backfill"]
    assert json.loads(storage.read_bytes(out["files"]["report"]))["floor"]["map_at_r"] == row["floor_map_at_r"]

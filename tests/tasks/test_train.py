"""Ray Train training end to end on tiny Fashion-MNIST shards (2 CPU workers of an in-process Ray):
learning and clear errors before training (BCT compatibility: test_train_bct.py; checkpoints and
resume: test_train_recovery.py)."""
from __future__ import annotations

import os

import pytest
import torch

from dml_core.config import ConfigError
from dml_core import storage
from dml_core.models.registry import build_model
from dml_core.training.metrics_log import read_metrics
from dml_core.training.state import save_state
from tasks.train import run_training
from dml_core.training.embed import embed_split, load_checkpoint_model
from tests.tasks._train_helpers import SMALL_CNN, eval_recall, small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards):
    """A run shared by the tests (BCT is tested on the many-class font glyphs in test_train_bct.py)."""
    root = str(tmp_path_factory.mktemp("train-root"))
    new = run_training(small_config(root, fmnist_shards, "new", steps=150, train={"seed": 1}))
    return {"root": root, "new": new}


def test_two_workers_raise_recall_well_above_the_untrained_model(runs, fmnist_shards):
    new = runs["new"]
    assert new.final["step"] == 150 and new.metrics["step"] == 150
    torch.manual_seed(1)  # the loop seeds the model init with train.seed
    untrained = build_model("small_cnn", embedding_dim=SMALL_CNN["embedding_dim"], image_size=28,
                            **SMALL_CNN["backbone_options"])
    before = eval_recall(untrained, fmnist_shards)
    after = eval_recall(load_checkpoint_model(new.checkpoint), fmnist_shards)
    print(f"Recall@1 on the evaluation classes: untrained {before:.3f}, trained {after:.3f}")
    assert after >= before + 0.06, (before, after)

    records = read_metrics(storage.join(new.run_dir, "metrics.jsonl"))
    steps = [r for r in records if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 151))
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert sum(r["loss"] for r in steps[-20:]) < sum(r["loss"] for r in steps[:20])
    assert storage.exists(storage.join(new.run_dir, "config.yaml"))


def test_embed_split_of_a_ray_checkpoint_equals_the_model_run_by_hand(runs, fmnist_shards):
    import io

    from dml_core.data.decode import decode_sample
    from dml_core.data.shard_stream import iter_samples

    manifest = fmnist_shards["manifest"]
    ckpt = torch.load(io.BytesIO(storage.read_bytes(storage.join(runs["new"].checkpoint, "model.pt"))),
                      weights_only=True)
    spec = dict(ckpt["spec"])
    model = build_model(spec.pop("name"), **spec.pop("kwargs", {}), **spec)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    samples = [decode_sample(s, image_size=28, channels=1) for s in iter_samples(manifest.shard_urls("eval"))]
    with torch.no_grad():
        by_hand = {d.id: (model(d.image[None])[0], d.label) for d in samples}

    z, labels, ids = embed_split(runs["new"].checkpoint, manifest, "eval")
    assert sorted(ids.tolist()) == sorted(by_hand) and len(ids) == manifest.split("eval").count
    for row, (i, label) in enumerate(zip(ids.tolist(), labels.tolist())):
        torch.testing.assert_close(z[row], by_hand[i][0], rtol=1e-4, atol=1e-5)
        assert label == by_hand[i][1]
    # Two ranks' shares are disjoint and cover the split with the same embeddings.
    shares = [embed_split(runs["new"].checkpoint, manifest, "eval", rank=r, world_size=2) for r in (0, 1)]
    assert not set(shares[0].ids.tolist()) & set(shares[1].ids.tolist())
    merged = {i: zi for share in shares for i, zi in zip(share.ids.tolist(), share.z)}
    assert merged.keys() == by_hand.keys()
    for i, zi in merged.items():
        torch.testing.assert_close(zi, by_hand[i][0], rtol=1e-4, atol=1e-5)


def test_keep_best_applies_to_checkpoints_ray_never_registered(tmp_path, fmnist_shards):
    from dml_core.training.state import CHECKPOINT_NAME

    cfg = small_config(str(tmp_path), fmnist_shards, "prune", steps=8,
                       train={"checkpoint_every": 2, "keep_best": 2})
    stray = os.path.join(cfg.run_dir, "checkpoints", "checkpoint_00000001")  # as if left by a killed worker
    os.makedirs(stray)
    open(os.path.join(stray, "model.pt"), "wb").close()  # unreadable: the run starts from scratch
    out = run_training(cfg)
    left = sorted(filter(CHECKPOINT_NAME.fullmatch, os.listdir(os.path.join(cfg.run_dir, "checkpoints"))))
    assert out.final["start_step"] == 0 and "checkpoint_00000001" not in left
    assert "checkpoint_00000008" in left and len(left) <= 3, left  # the latest and the 2 best by loss_avg


def test_a_run_prints_our_progress_and_not_rays_known_noise(tmp_path, fmnist_shards):
    """A fresh process, as a user's: Ray's token-auth warning, the PlacementGroupCleaner's state-API
    complaints and deprecation warnings stay off the console; the progress line is there."""
    import subprocess
    import sys

    cfg = small_config(str(tmp_path), fmnist_shards, "quiet", steps=20, train={"log_every": 20})
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    script = ("from dml_core.config import load_config; from tasks.train import run_training; "
              f"run_training(load_config({str(tmp_path / 'cfg.yaml')!r}))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert "step 20/20" in console
    for noise in ("Token authentication", "Failed to query Ray Train Controller", "FutureWarning",
                  "PreemptionWatcher"):
        assert noise not in console, noise


# ------------------------------------------------------------------ errors before training -------

def _assert_nothing_trained(cfg):
    run = storage.join(cfg.run.root, "runs", cfg.run.name)
    assert not storage.exists(storage.join(run, "checkpoints"))
    assert not storage.exists(storage.join(run, "metrics.jsonl"))


def test_bct_embedding_dim_mismatch_is_refused(tmp_path, fmnist_shards):
    old = build_model("small_cnn", embedding_dim=16, image_size=28, widths=[8, 16])
    save_state(str(tmp_path / "old"), old, None, None, None, step=0, config={})
    cfg = small_config(str(tmp_path), fmnist_shards, "dim", steps=5,
                       loss={"bct": {"old_checkpoint": str(tmp_path / "old")}})
    with pytest.raises(ConfigError, match=r"model.embedding_dim=32 differs from the BCT old model's embedding dim 16"):
        run_training(cfg)
    _assert_nothing_trained(cfg)


def test_missing_bct_checkpoint_and_missing_dataset_are_refused(tmp_path, fmnist_shards):
    cfg = small_config(str(tmp_path), fmnist_shards, "nobct", steps=5,
                       loss={"bct": {"old_checkpoint": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match="old_checkpoint: no model file"):
        run_training(cfg)
    cfg = small_config(str(tmp_path), dict(fmnist_shards, name="no-such-set"), "nodata", steps=5)
    with pytest.raises(ConfigError, match="no-such-set"):
        run_training(cfg)
    cfg = small_config(str(tmp_path), fmnist_shards, "bigp", steps=5, data={"p": 8, "k": 4})
    with pytest.raises(ConfigError, match="data.p=8 classes per batch"):
        run_training(cfg)
    _assert_nothing_trained(cfg)


def test_more_workers_than_the_cluster_can_place_is_refused(tmp_path, fmnist_shards):
    cfg = small_config(str(tmp_path), fmnist_shards, "big", steps=5, ray={"num_workers": 64})
    with pytest.raises(ValueError, match=r"ray.num_workers=64 workers need 64 CPU"):
        run_training(cfg)
    cfg = small_config(str(tmp_path), fmnist_shards, "fat", steps=5, ray={"resources_per_worker": {"CPU": 1000}})
    with pytest.raises(ValueError, match="ray.num_workers=2"):
        run_training(cfg)
    _assert_nothing_trained(cfg)


def test_unreachable_storage_is_refused(tmp_path, fmnist_shards):
    from tests.conftest import free_port

    cfg = small_config("s3://nowhere/x", fmnist_shards, "s3", steps=5,
                       storage={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    saved = {k: os.environ.pop(k, None) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_MAX_ATTEMPTS="1")
    try:
        with pytest.raises(ConfigError, match=r"run.root: storage s3://nowhere/x/runs/s3 is not writable or unreachable"):
            run_training(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        os.environ.pop("AWS_MAX_ATTEMPTS", None)

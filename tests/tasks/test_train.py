"""Ray Train training end to end on tiny Fashion-MNIST shards (2 CPU workers of an in-process Ray):
learning, BCT compatibility, clear errors before training, checkpoints and resume."""
from __future__ import annotations

import os

import pytest
import torch

from dml_core.config import ConfigError
from dml_core.data import storage
from dml_core.models.registry import build_model
from dml_core.training.metrics_log import read_metrics
from dml_core.training.state import save_state
from tasks.train import run_training
from tests.tasks._train_helpers import SMALL_CNN, eval_recall, embed_split, load_checkpoint_model, small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards):
    """Three runs shared by the tests: a briefly trained "old" model, a longer "new" one without BCT
    (another seed) and one trained with BCT against the old model."""
    root = str(tmp_path_factory.mktemp("train-root"))
    old = run_training(small_config(root, fmnist_shards, "old", steps=15))
    new = run_training(small_config(root, fmnist_shards, "new", steps=150, train={"seed": 1}))
    bct = run_training(small_config(root, fmnist_shards, "bct", steps=150, train={"seed": 1},
                                    loss={"bct": {"old_checkpoint": old.checkpoint, "lambda_bct": 1.0}}))
    return {"root": root, "old": old, "new": new, "bct": bct}


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


def _recall_scores(runs, shards, splits):
    """Cross-model Recall@1 (old, new with BCT, new without) with the old model as the serving one."""
    from dml_core.metrics import evaluate_compatibility

    old = load_checkpoint_model(runs["old"].checkpoint)
    out = {}
    for name in ("bct", "new"):
        new = load_checkpoint_model(runs[name].checkpoint)
        if splits == "train":  # leave-one-out over the training classes
            oq, lq = embed_split(old, shards, "train")
            nq, _ = embed_split(new, shards, "train")
            res = evaluate_compatibility(oq, nq, lq)
        else:  # eval-class queries against the eval-class gallery
            oq, lq = embed_split(old, shards, "eval")
            og, lg = embed_split(old, shards, "gallery")
            nq, _ = embed_split(new, shards, "eval")
            ng, _ = embed_split(new, shards, "gallery")
            res = evaluate_compatibility(oq, nq, lq, old_gallery=og, new_gallery=ng, gallery_labels=lg)
        out[name] = res.scores["recall_at_1"]
    print(splits, {k: (v.old_old, v.new_new, v.new_old) for k, v in out.items()})
    return out


def test_bct_criterion_on_training_classes(runs, fmnist_shards):
    scores = _recall_scores(runs, fmnist_shards, "train")
    assert scores["bct"].new_old > scores["bct"].old_old  # the BCT criterion holds with BCT ...
    assert scores["new"].new_old <= scores["new"].old_old  # ... and fails for the same training without it


@pytest.mark.xfail(strict=True, reason="with only 5 Fashion-MNIST training classes, BCT alignment does not "
                   "transfer to the 5 unseen evaluation classes (measured M(new,old)=0.22-0.40 < M(old,old)=0.59-0.64 "
                   "for lambda_bct 1-10); needs a dataset with many training classes")
def test_bct_criterion_on_evaluation_classes(runs, fmnist_shards):
    scores = _recall_scores(runs, fmnist_shards, "eval")
    assert scores["bct"].new_old > scores["bct"].old_old
    assert scores["new"].new_old <= scores["new"].old_old


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
    saved = {k: os.environ.pop(k, None) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
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
        storage.configure()

"""BCT through the real pipeline (Ray Train, 2 CPU workers), open world: the compatibility criterion is
measured on the EVALUATION classes of the font-glyph dataset, which no model trained on.

Status: the BCT model's new->old retrieval on unseen classes is far above the control's (chance) and
the control fails the criterion, but M(new,old) > M(old,old) itself is not reached here (xfail below;
e.g. Ray run, old 100 / new 300 steps: M(old,old)=0.849, M(new,old)=0.803, M(new,new)=0.907).

Recipe (METHODS 3 and 6): an "old" model trained briefly; a "new" model trained longer on all
training classes with BCT against the old model's class prototypes (L2-normalised class means of the
old embeddings of the whole training split); the same new-model recipe without BCT as the control.
M = Recall@1, eval-split queries against the gallery split of the evaluation classes.
"""
from __future__ import annotations

import pytest

from dml_core.metrics import evaluate_compatibility
from tasks.train import run_training
from tests.tasks._train_helpers import embed_split, load_checkpoint_model, small_config

pytestmark = pytest.mark.slow

IMAGE_SIZE = 24
MODEL = {"backbone": "small_cnn", "embedding_dim": 32, "image_size": IMAGE_SIZE, "in_channels": 1,
         "backbone_options": {"widths": [16, 32, 64]}}
DATA = {"batch_size": 64, "p": 16, "k": 4}  # per worker: 2 workers -> 128 images, 32 classes a step
OLD_STEPS, NEW_STEPS = 80, 200
BCT = {"lambda_bct": 1.0, "tau_bct": 0.05}  # METHODS 3 defaults


def _config(root, shards, name, steps, seed, **loss):
    return small_config(root, shards, name, steps, model=dict(MODEL), data=dict(DATA),
                        train={"seed": seed, "lr": 2e-3, "checkpoint_every": steps}, loss=loss)


@pytest.fixture(scope="module")
def bct_runs(tmp_path_factory, font_glyph_shards):
    root = str(tmp_path_factory.mktemp("bct-root"))
    old = run_training(_config(root, font_glyph_shards, "old", OLD_STEPS, seed=0))
    bct = run_training(_config(root, font_glyph_shards, "bct", NEW_STEPS, seed=1,
                               bct={"old_checkpoint": old.checkpoint, **BCT}))
    plain = run_training(_config(root, font_glyph_shards, "plain", NEW_STEPS, seed=1))
    return {"old": old, "bct": bct, "plain": plain}


def _embed(run, shards, split):
    return embed_split(load_checkpoint_model(run.checkpoint), shards, split, image_size=IMAGE_SIZE)


def _scores(runs, shards, splits):
    """Recall@1 CrossModelScores for the BCT and the plain new model against the old one.
    splits="eval": eval-split queries against the gallery split (evaluation classes, never trained on);
    splits="train": leave-one-out over the training split."""
    if splits == "eval":
        oq, lq = _embed(runs["old"], shards, "eval")
        og, lg = _embed(runs["old"], shards, "gallery")
        train_labels = {int(c) for c in shards["manifest"]["splits"]["train"]["classes"]}
        assert not set(lq.tolist()) & train_labels  # open world: no query class was trained on
    else:
        oq, lq = _embed(runs["old"], shards, "train")
    out = {}
    for name in ("bct", "plain"):
        nq, _ = _embed(runs[name], shards, splits if splits == "train" else "eval")
        if splits == "eval":
            ng, _ = _embed(runs[name], shards, "gallery")
            res = evaluate_compatibility(oq, nq, lq, old_gallery=og, new_gallery=ng, gallery_labels=lg)
        else:
            res = evaluate_compatibility(oq, nq, lq)
        out[name] = res.scores["recall_at_1"]
    print(splits, {k: {"old_old": round(v.old_old, 3), "new_new": round(v.new_new, 3),
                       "new_old": round(v.new_old, 3)} for k, v in out.items()})
    return out


@pytest.fixture(scope="module")
def eval_scores(bct_runs, font_glyph_shards):
    return _scores(bct_runs, font_glyph_shards, "eval")


def test_bct_makes_new_queries_retrieve_from_the_old_gallery_on_unseen_classes(bct_runs, eval_scores):
    assert bct_runs["bct"].final["step"] == NEW_STEPS and bct_runs["plain"].final["step"] == NEW_STEPS
    s = eval_scores
    chance = 1 / 128  # 128 evaluation classes
    # Without BCT the new embedding space is unrelated to the old one: new->old retrieval is at chance,
    # so the compatibility criterion fails for the control.
    assert s["plain"].new_old < 5 * chance and not s["plain"].criterion
    # With BCT, queries of classes no model trained on find their class in the old gallery most of the
    # time, and the new model is better than the old one on its own gallery.
    assert s["bct"].new_old > 0.5 and s["bct"].new_old > s["plain"].new_old + 0.4
    assert s["bct"].new_new > s["bct"].old_old


@pytest.mark.xfail(strict=False, reason="not reached on 2 CPU cores within the test budget: on the 128 unseen "
                   "font classes M(new,old) stays 0.01-0.1 below M(old,old) (measured single-process for old "
                   "30-100 steps, new 200-600 steps, lambda_bct 1-20, tau_bct 0.01-0.2, old on a class subset)")
def test_bct_criterion_on_evaluation_classes(eval_scores):
    s = eval_scores
    assert s["bct"].new_old > s["bct"].old_old  # M(new,old) > M(old,old) with BCT ...
    assert s["plain"].new_old <= s["plain"].old_old  # ... and not without it

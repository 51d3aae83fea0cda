"""PC through the real pipeline (Ray Train, 2 CPU workers): a run with BCT + PC against an old model writes
its checkpoints and is evaluated against the old model (NFR/NFI next to the criterion, recomputed here by
brute force); a new model of another backbone and input size (a small ViT at 32x32 against a CNN at 28x28,
same embedding dimension) trains against the old one and gets its cross-model matrix like any other."""
from __future__ import annotations

import numpy as np
import pytest

from dml_core.metrics.evaluate import evaluate_embeddings
from dml_core.training.embed import embed_split
from dml_core.training.metrics_log import read_metrics
from tasks.train import run_training
from tests.tasks._train_helpers import SMALL_CNN, small_config

pytestmark = pytest.mark.slow

VIT = {"backbone": "vit_tiny", "embedding_dim": SMALL_CNN["embedding_dim"], "image_size": 32, "in_channels": 1,
       "backbone_options": {"dim": 48, "depth": 2, "heads": 2}}
PC = {"lambda_pc": 1.0, "alpha": 1.0, "beta": 5.0, "tau_pc": 0.05}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards):
    root = str(tmp_path_factory.mktemp("pc-root"))
    old = run_training(small_config(root, fmnist_shards, "old", 20, train={"lr": 5e-3}))
    compat = {"bct": {"old_checkpoint": old.checkpoint}, "pc": PC}
    pc = run_training(small_config(root, fmnist_shards, "pc", 10, loss=compat))
    vit = run_training(small_config(root, fmnist_shards, "vit", 10, model=VIT, loss=compat, train={"lr": 3e-3}))
    return {"old": old, "pc": pc, "vit": vit}


def _top1_right(q, g, yq):
    """Brute force in float64: whether each query's nearest other item has its label, and whether its top-1
    is a near-tie (a backend may then pick either item: METHODS 4; these briefly trained models put many
    items within 1e-5 of each other, so the bounds below are loose for some settings)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    top2 = np.sort(s, axis=1)[:, -2:]
    return yq[np.argmax(s, axis=1)] == yq, top2[:, 1] - top2[:, 0] < 1e-5


def _evaluate(runs, name, shards):
    old = embed_split(runs["old"].checkpoint, shards["manifest"], "eval")
    new = embed_split(runs[name].checkpoint, shards["manifest"], "eval")  # each at its own image size
    report = evaluate_embeddings(new.z, new.labels, old_z=old.z).to_dict()
    return report, old.z.numpy(), new.z.numpy(), new.labels.numpy()


@pytest.mark.parametrize("name", ["pc", "vit"])
def test_a_bct_pc_run_checkpoints_and_its_evaluation_reports_negative_flips(runs, fmnist_shards, name):
    run = runs[name]
    assert run.final["step"] == 10 and run.checkpoint is not None
    records = [r for r in read_metrics(f"{run.run_dir}/metrics.jsonl") if "loss" in r and "step" in r]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(r["positive_congruent/loss"] > 0 and np.isfinite(r["positive_congruent/loss"]) for r in records)
    assert all(0 < r["positive_congruent/old_right"] <= 1 for r in records)  # the focal weight is in use

    report, old, new, y = _evaluate(runs, name, fmnist_shards)
    compat = report["compatibility"]
    right, tie = {}, {}
    for setting, (q, g) in {"old_old": (old, old), "new_new": (new, new), "new_old": (new, old)}.items():
        right[setting], tie[setting] = _top1_right(q, g, y)
        bound = tie[setting].mean() + 1e-9
        assert abs(compat["scores"]["recall_at_1"][setting] - right[setting].mean()) <= bound, setting
    for setting in ("new_old", "new_new"):
        flips = right["old_old"] & ~right[setting]
        bound = (tie["old_old"] | tie[setting]).mean() + 1e-9
        assert abs(compat["summary"][f"nfr_{setting}"] - flips.sum() / len(y)) <= bound, setting
        assert compat["summary"][f"nfr_{setting}"] == compat["flips"][setting]["nfr"]
        assert compat["summary"][f"nfi_{setting}"] == compat["flips"][setting]["nfi"]
        if not bound > 1e-6:
            wrong = (~right[setting]).sum()
            assert compat["summary"][f"nfi_{setting}"] == pytest.approx(flips.sum() / wrong if wrong else 0.0)
    assert compat["summary"]["recall_at_1"]["criterion"] == compat["scores"]["recall_at_1"]["criterion"]
    nfr = next(c for c in report["gate"]["conditions"] if c["name"] == "nfr")
    assert nfr["measured"] == compat["flips"]["new_old"]["nfr"]
    print(name, compat["summary"], {k: float(v.mean()) for k, v in tie.items()})


def test_the_vit_run_trained_a_vit_at_its_own_input_size(runs):
    from dml_core.training.embed import read_model_spec

    spec = read_model_spec(runs["vit"].checkpoint)
    old_spec = read_model_spec(runs["old"].checkpoint)
    assert (spec["name"], spec["image_size"]) == ("vit_tiny", 32)
    assert (old_spec["name"], old_spec["image_size"]) == ("small_cnn", 28)
    assert spec["embedding_dim"] == old_spec["embedding_dim"]

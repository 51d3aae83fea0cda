"""`fit` without Ray: a plain process trains, writes its checkpoints to the run's storage and tells `report`,
and a second call of the same run resumes from the newest one on storage with the loss state it saved."""
import os

import pytest

from dml_core.config import ConfigError
from dml_core.training.loop import Worker, fit
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name, load_state, state_digest
from tests.tasks._train_helpers import small_config

pytestmark = pytest.mark.slow


def keep_checkpoints(run_dir: str, steps: list):
    """A `report` that records the steps and checks that each checkpoint is complete on storage when told."""
    def report(metrics, checkpoint_url):
        steps.append(metrics["step"])
        assert checkpoint_url == os.path.join(run_dir, CHECKPOINTS, checkpoint_dir_name(metrics["step"]))
        assert load_state(checkpoint_url)["step"] == metrics["step"]
    return report


def test_fit_in_a_plain_process_checkpoints_and_resumes(tmp_path, fmnist_shards):
    over = {"loss": {"base": "decomposable"}, "train": {"checkpoint_every": 4}, "ray": {"num_workers": 1}}
    cfg = small_config(str(tmp_path), fmnist_shards, "plain", steps=8, **over)
    reported: list[int] = []
    first = fit(cfg, fmnist_shards["manifest"], Worker(report=keep_checkpoints(cfg.run_dir, reported)))
    assert (first["start_step"], first["step"], reported) == (0, 8, [4, 8])
    saved = load_state(os.path.join(cfg.run_dir, CHECKPOINTS, checkpoint_dir_name(8)))
    assert first["loss_state_digest"] == state_digest(saved["loss"]) and int(saved["loss"]["seen"].sum()) > 0

    cfg = small_config(str(tmp_path), fmnist_shards, "plain", steps=12, **over)
    reported.clear()
    second = fit(cfg, fmnist_shards["manifest"], Worker(report=keep_checkpoints(cfg.run_dir, reported)))
    assert (second["start_step"], second["step"], reported) == (8, 12, [12])


def test_init_checkpoint_starts_from_its_weights_and_must_hold_the_same_model(tmp_path, fmnist_shards):
    import torch

    from dml_core.training.embed import load_checkpoint_model
    from dml_core.training.preflight import preflight

    over = {"train": {"checkpoint_every": 100}, "ray": {"num_workers": 1}}
    first = small_config(str(tmp_path), fmnist_shards, "first", steps=3, **over)
    fit(first, fmnist_shards["manifest"], Worker())
    start = os.path.join(first.run_dir, CHECKPOINTS, checkpoint_dir_name(3))
    params = lambda m: dict(m.named_parameters())  # noqa: E731 - BatchNorm's running stats move even at lr 0

    frozen = small_config(str(tmp_path), fmnist_shards, "frozen", steps=2, **over)
    frozen.train.lr, frozen.train.weight_decay, frozen.train.init_checkpoint = 0.0, 0.0, start
    preflight(frozen)
    fit(frozen, fmnist_shards["manifest"], Worker())
    got = load_checkpoint_model(os.path.join(frozen.run_dir, CHECKPOINTS, checkpoint_dir_name(2)))
    want = load_checkpoint_model(start)
    assert all(torch.equal(v, params(want)[k]) for k, v in params(got).items())  # lr 0: still the start weights
    fresh = small_config(str(tmp_path), fmnist_shards, "fresh", steps=2, **over)
    fresh.train.lr = 0.0
    fit(fresh, fmnist_shards["manifest"], Worker())
    other = load_checkpoint_model(os.path.join(fresh.run_dir, CHECKPOINTS, checkpoint_dir_name(2)))
    assert not all(torch.equal(v, params(want)[k]) for k, v in params(other).items())  # without it: train.seed's

    frozen.model.embedding_dim = 8
    with pytest.raises(ConfigError, match=r"init_checkpoint .* holds another model: embedding_dim 32 \(model: 8\);"):
        preflight(frozen)

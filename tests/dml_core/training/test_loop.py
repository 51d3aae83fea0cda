"""`fit` without Ray: a plain process trains, writes its checkpoints to the run's storage and tells `report`,
and a second call of the same run resumes from the newest one on storage with the loss state it saved
(the decomposable state, the class proxies); two gloo ranks keep the same proxies."""
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


def _stop_at(stop: int):
    def on_step(step, rank):
        if step == stop:
            raise RuntimeError(f"stopped at step {step}")
    return on_step


def _fit_loss_digest(rank, world, cfg_dict, manifest):
    from dml_core.config import config_from_dict

    return fit(config_from_dict(cfg_dict), manifest, Worker(rank=rank, world_size=world))["loss_state_digest"]


@pytest.mark.parametrize("base", ["arcface", "proxy_anchor"])
def test_fit_trains_class_proxies_checkpoints_them_and_resumes_from_them(tmp_path, fmnist_shards, base):
    """The resumed run reads a reseeded data stream (`TrainReader.epoch`), so it is not the uninterrupted run
    batch for batch; that equality, given the same batches, is `test_state.py`'s. Here: the proxies train,
    are saved, and the resume starts from the saved ones."""
    import torch

    from dml_core.training.build import build_loss, num_proxy_classes
    from dml_core.training.metrics_log import read_metrics

    manifest = fmnist_shards["manifest"]
    cfg = small_config(str(tmp_path), fmnist_shards, "proxies", steps=6, loss={"base": base},
                       train={"checkpoint_every": 3}, ray={"num_workers": 1})
    with pytest.raises(RuntimeError, match="stopped"):  # after the checkpoint of step 3
        fit(cfg, manifest, Worker(on_step=_stop_at(3)))
    assert fit(cfg, manifest, Worker())["start_step"] == 3

    def saved(step):
        return load_state(os.path.join(cfg.run_dir, CHECKPOINTS, checkpoint_dir_name(step)))["loss"]

    initial = build_loss(cfg, num_classes=num_proxy_classes(cfg, manifest)).proxies.detach()
    assert initial.shape == (5, 32)  # one proxy per training class of the tiny dataset
    assert not torch.allclose(saved(3)["proxies"], initial)
    assert not torch.allclose(saved(6)["proxies"], saved(3)["proxies"])
    (resumed,) = [r for r in read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl")) if r.get("event") == "resumed"]
    assert resumed["loss_state_digest"] == state_digest(saved(3))  # restored, not initialised again


def test_two_ranks_train_the_same_class_proxies(tmp_path, fmnist_shards, gloo):
    """The proxies are not in the model's DDP: the loop averages their gradients, so the ranks never drift."""
    from dml_core.training.build import build_loss

    cfg = small_config(str(tmp_path), fmnist_shards, "two", steps=4, loss={"base": "proxy_anchor"},
                       ray={"num_workers": 2}, train={"checkpoint_every": 4})
    digests = gloo(_fit_loss_digest, 2, cfg.to_dict(), fmnist_shards["manifest"])
    saved = load_state(os.path.join(cfg.run_dir, CHECKPOINTS, checkpoint_dir_name(4)))["loss"]
    assert digests[0] == digests[1] == state_digest(saved)
    assert digests[0] != state_digest(build_loss(cfg, num_classes=5).state_dict())

"""PC in a run: its config (an old model required, named errors), the pre-flight on the old model, and the
two sources of old embeddings giving the same training losses in `fit` on 2 gloo ranks."""
import pytest
import torch

from dml_core.config import ConfigError, config_from_dict
from dml_core.models.registry import build_model
from dml_core.training.embed import embed_split
from dml_core.training.loop import Worker, fit
from dml_core.training.metrics_log import read_metrics
from dml_core.training.pc import old_embedding_table, pc_mode
from dml_core.training.preflight import check_data
from dml_core.training.state import save_state
from tests.tasks._train_helpers import SMALL_CNN, small_config

BCT = {"old_checkpoint": "/nowhere/old"}


def _raw(**loss) -> dict:
    return {"data": {"batch_size": 8, "p": 4, "k": 2}, "loss": loss}


@pytest.mark.parametrize("loss, augment, field, match", [
    ({"pc": {}}, False, "loss.pc", "needs an old model: set loss.bct.old_checkpoint"),
    ({"bct": BCT, "pc": {"tau_pc": 0}}, False, "loss.pc", "tau_pc must be > 0"),
    ({"bct": BCT, "pc": {"alpha": -1}}, False, "loss.pc", "alpha must be >= 0"),
    ({"bct": BCT, "pc": {"alpha": 0, "beta": 0}}, False, "loss.pc", "both 0"),
    ({"bct": BCT, "pc": {"old_embeddings": "cached"}}, False, "loss.pc.old_embeddings", "must be one of"),
    ({"bct": BCT, "pc": {"old_embeddings": "precomputed"}}, True, "loss.pc.old_embeddings", "un-augmented"),
    ({"bct": BCT, "pc": {"lambda": 1}}, False, "loss.pc.lambda", "unknown key"),
])
def test_bad_pc_configs_name_the_field(loss, augment, field, match):
    raw = _raw(**loss)
    raw["data"]["augment"] = augment
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict(raw)
    assert field in str(e.value)


def test_pc_defaults_follow_methods_and_auto_resolves_by_augmentation():
    cfg = config_from_dict(_raw(bct=BCT, pc={}))
    p = cfg.loss.pc
    assert (p.lambda_pc, p.alpha, p.beta, p.tau_pc, p.old_embeddings) == (1.0, 1.0, 5.0, 0.05, "auto")
    assert pc_mode(cfg) == "precomputed"
    raw = _raw(bct=BCT, pc={})
    raw["data"]["augment"] = True
    assert pc_mode(config_from_dict(raw)) == "on_the_fly"
    assert config_from_dict(_raw(bct={**BCT, "lambda_bct": 0}, pc={})).loss.bct.lambda_bct == 0  # PC alone


def _old_checkpoint(path, **model) -> str:
    torch.manual_seed(1)
    spec = {**SMALL_CNN, **model}
    old = build_model(spec["backbone"], embedding_dim=spec["embedding_dim"], image_size=spec["image_size"],
                      in_channels=spec["in_channels"], **spec["backbone_options"])
    save_state(str(path), old, None, None, None, step=0, config={})
    return str(path)


def test_preflight_refuses_an_old_model_of_another_dimension_or_input(tmp_path, fmnist_shards):
    wide = _old_checkpoint(tmp_path / "wide", embedding_dim=16)
    cfg = small_config(str(tmp_path), fmnist_shards, "r", 2, loss={"bct": {"old_checkpoint": wide}, "pc": {}})
    with pytest.raises(ConfigError, match=r"model.embedding_dim=32 differs from the BCT old model's embedding "
                                          r"dim 16 .*BCT and PC need equal dims"):
        check_data(cfg, fmnist_shards["manifest"])
    big = _old_checkpoint(tmp_path / "big", image_size=32)
    for mode in ("on_the_fly", "auto"):
        cfg = small_config(str(tmp_path), fmnist_shards, "r", 2, data={"augment": mode == "auto"},
                           loss={"bct": {"old_checkpoint": big}, "pc": {"old_embeddings": mode}})
        with pytest.raises(ConfigError, match=r"loss.pc.old_embeddings=on_the_fly .*image_size is 32 and "
                                              r"model.image_size is 28; use old_embeddings: precomputed"):
            check_data(cfg, fmnist_shards["manifest"])
    cfg = small_config(str(tmp_path), fmnist_shards, "r", 2, loss={"bct": {"old_checkpoint": big}, "pc": {}})
    check_data(cfg, fmnist_shards["manifest"])  # precomputed: each model embeds at its own size


def _table_rows(rank, world, old_checkpoint, manifest):
    share = embed_split(old_checkpoint, manifest, "train", rank=rank, world_size=world, batch_size=16)
    table = old_embedding_table(share, manifest.num_ids, world)
    return table.table.numpy().copy(), table.known.numpy().copy()


@pytest.mark.slow
def test_the_precomputed_table_of_two_ranks_holds_every_training_sample(tmp_path, fmnist_shards, gloo):
    old, manifest = _old_checkpoint(tmp_path / "old"), fmnist_shards["manifest"]
    per_rank = gloo(_table_rows, 2, old, manifest)
    z, _, ids = embed_split(old, manifest, "train")
    for table, known in per_rank:
        assert known.sum() == len(ids) == manifest.split("train").count
        torch.testing.assert_close(torch.from_numpy(table)[ids], torch.nn.functional.normalize(z, dim=1),
                                   rtol=1e-6, atol=1e-6)


def _fit_losses(rank, world, cfg_dict, manifest):
    cfg = config_from_dict(cfg_dict)
    fit(cfg, manifest, Worker(rank=rank, world_size=world))
    if rank != 0:
        return None
    return [r for r in read_metrics(f"{cfg.run_dir}/metrics.jsonl") if "step" in r and "loss" in r]


def _trained_old(root, shards) -> str:
    """An old model trained a few steps: an untrained one embeds every image alike (uniform p_old)."""
    urls = []
    cfg = small_config(root, shards, "old", 8, train={"lr": 1e-2, "warmup_steps": 0}, ray={"num_workers": 1})
    fit(cfg, shards["manifest"], Worker(report=lambda metrics, url: urls.append(url)))
    return urls[-1]


@pytest.mark.slow
def test_precomputed_and_on_the_fly_old_embeddings_train_alike_on_two_ranks(tmp_path, fmnist_shards, gloo):
    old = _trained_old(str(tmp_path), fmnist_shards)
    records = {}
    for mode in ("precomputed", "on_the_fly"):
        cfg = small_config(str(tmp_path), fmnist_shards, mode, 4, ray={"num_workers": 2},
                           loss={"bct": {"old_checkpoint": old}, "pc": {"old_embeddings": mode}})
        records[mode] = gloo(_fit_losses, 2, cfg.to_dict(), fmnist_shards["manifest"])[0]
    a, b = records["precomputed"], records["on_the_fly"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "positive_congruent/loss", "positive_congruent/old_right", "bct/loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
        assert ra["positive_congruent/loss"] > 1e-3  # the term is not trivially zero

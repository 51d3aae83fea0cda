"""Training state round trip: a restored run continues exactly like the uninterrupted one, with the
decomposable state or the class proxies (METHODS.md 2.1); a checkpoint without proxies resumes into a proxy loss."""
import os

import pytest
import torch

from dml_core.config import config_from_dict
from dml_core.training.build import build_loss, build_model_from_config, build_optimizer, build_schedule, lr_factor
from dml_core.training.state import (checkpoint_names, load_state, newest_checkpoint, prune_checkpoints,
                                     restore_state, save_state)
from dml_core.training.step import train_step

def config(base: str):
    return config_from_dict({"model": {"backbone": "small_cnn", "embedding_dim": 16, "image_size": 8},
                             "loss": {"base": base, "tcm": {}}, "data": {"batch_size": 8, "p": 2, "k": 4},
                             "train": {"steps": 6, "warmup_steps": 2, "lr": 1e-2}})


CFG = config("decomposable")


def make(cfg=CFG):
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    loss = build_loss(cfg, num_samples=40, num_classes=2)
    opt = build_optimizer(cfg, model, loss)
    return model, loss, opt, build_schedule(cfg, opt)


def batches(n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randperm(40, generator=g)[:8]
        yield torch.rand(8, 1, 8, 8, generator=g), ids % 2, ids


def run(model, loss, opt, sched, data):
    return [train_step(model, loss, x, y, i, opt, sched)["loss"] for x, y, i in data]


def interrupted_and_uninterrupted(tmp_path, cfg):
    """Three steps, a checkpoint, three more from fresh objects; against six in one go. Returns the first half's
    objects and the restored ones (model, loss, optimizer, schedule) and the saved state."""
    data = list(batches(6))
    ref = make(cfg)
    ref_losses = run(*ref, data)

    first = make(cfg)
    losses = run(*first, data[:3])
    save_state(str(tmp_path), first[0], first[2], first[3], first[1], step=3, config=cfg.to_dict())
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model.pt", "state.pt"]

    second = make(cfg)  # fresh objects: everything must come from the files
    state = load_state(str(tmp_path))
    assert restore_state(state, second[0], second[2], second[3], second[1]) == 3
    assert state["config"] == cfg.to_dict()
    restored = [t.clone() for t in second[1].state_dict().values()]
    losses += run(*second, data[3:])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for p, q in zip([*second[0].parameters(), *second[1].parameters()], [*ref[0].parameters(), *ref[1].parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for got, want in zip(restored, first[1].state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the loss state as saved
    return first, second, state


def test_resume_matches_uninterrupted_run(tmp_path):
    first, second, _ = interrupted_and_uninterrupted(tmp_path, CFG)
    assert int(first[1].terms[0].seen.sum()) > 0  # the decomposable state is restored, not reset


@pytest.mark.parametrize("base", ["arcface", "cosface", "proxy_anchor"])
def test_resume_with_class_proxies_matches_uninterrupted_run(tmp_path, base):
    cfg = config(base)
    initial = make(cfg)[1].terms[0].proxies.detach().clone()
    first, second, state = interrupted_and_uninterrupted(tmp_path, cfg)
    saved = state["loss"]["terms.0.proxies"]  # in the checkpoint, trained
    assert torch.equal(saved, first[1].terms[0].proxies.detach()) and not torch.allclose(saved, initial)
    lrs = [g["lr"] for g in second[2].param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * cfg.loss.proxy_lr_mult) and len(lrs) == 2  # their own learning rate
    assert len(second[2].param_groups[1]["params"]) == 1


def test_a_checkpoint_without_proxies_resumes_into_a_proxy_loss(tmp_path):
    """An InfoNCE run resumed as ArcFace (run.allow_config_change): the model, its optimizer state and the
    schedule come from the checkpoint; the proxies start from their initial values, on the schedule."""
    data = list(batches(6))
    first = make(config("info_nce"))
    run(*first, data[:3])
    save_state(str(tmp_path), first[0], first[2], first[3], first[1], step=3, config={})
    cfg = config("arcface")
    model, loss, opt, sched = make(cfg)
    initial = loss.terms[0].proxies.detach().clone()
    assert restore_state(load_state(str(tmp_path)), model, opt, sched, loss) == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), first[0].parameters()))
    assert torch.equal(loss.terms[0].proxies, initial)
    assert opt.state_dict()["state"].keys() == first[2].state_dict()["state"].keys()  # none for the proxies yet
    lr_now = cfg.train.lr * lr_factor(3, cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_now, lr_now * cfg.loss.proxy_lr_mult])
    assert all(torch.isfinite(torch.tensor(run(model, loss, opt, sched, data[3:4]))))
    assert not torch.equal(loss.terms[0].proxies, initial)
    lr_next = cfg.train.lr * lr_factor(4, cfg.train.steps, cfg.train.warmup_steps, cfg.train.schedule)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_next, lr_next * cfg.loss.proxy_lr_mult])


def test_model_file_loads_with_the_model_loader(tmp_path):
    from dml_core.models.checkpoint import load_model

    model, loss, opt, sched = make()
    save_state(str(tmp_path), model, opt, sched, loss, step=0, config={})
    again = load_model(str(tmp_path / "model.pt"))
    x = torch.rand(3, 1, 8, 8)
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x))


def test_newest_checkpoint_skips_an_incomplete_one(tmp_path):
    model, loss, opt, sched = make()
    assert newest_checkpoint(str(tmp_path / "none-yet")) is None
    for step in (5, 10, 15):
        save_state(str(tmp_path / f"checkpoint_{step:08d}"), model, opt, sched, loss, step=step, config={})
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # other files in the folder are ignored
    url, state = newest_checkpoint(str(tmp_path))
    assert url.endswith("checkpoint_00000015") and state["step"] == 15
    # A crash while step 15 was written: a truncated state file, then a missing one.
    state_file = tmp_path / "checkpoint_00000015" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    url, state = newest_checkpoint(str(tmp_path))
    assert url.endswith("checkpoint_00000010") and state["step"] == 10
    state_file.unlink()
    assert newest_checkpoint(str(tmp_path))[1]["step"] == 10


def test_prune_keeps_the_newest_and_the_best_scored_from_metrics_json_or_old_state(tmp_path):
    model, loss, opt, sched = make()
    for step, loss_avg in ((5, 0.5), (10, 0.1), (15, 0.9), (20, 0.01), (25, 0.8)):
        save_state(str(tmp_path / f"checkpoint_{step:08d}"), model, opt, sched, loss, step=step, config={},
                   metrics={"step": step, "loss_avg": loss_avg})
    (tmp_path / "checkpoint_00000020" / "metrics.json").unlink()  # written before metrics.json existed
    (tmp_path / "checkpoint_00000005" / "metrics.json").write_text('{"loss_avg": 0.05}')  # pruning reads this
    (tmp_path / "checkpoint_00000030").mkdir()  # a crash before its first file was complete
    (tmp_path / "checkpoint_00000030" / "model.pt").write_bytes(b"torn")
    gone = prune_checkpoints(str(tmp_path), keep_best=2)
    assert sorted(os.path.basename(g) for g in gone) == ["checkpoint_00000010", "checkpoint_00000015",
                                                         "checkpoint_00000030"]
    assert checkpoint_names(str(tmp_path)) == ["checkpoint_00000005", "checkpoint_00000020", "checkpoint_00000025"]


def test_proxy_losses_are_built_from_the_config():
    from dml_core.losses import ArcFace, CosFace, ProxyAnchor

    raw = {"loss": {"base": "arcface"}, "model": {"embedding_dim": 16}, "train": {"seed": 3}}
    arcface = build_loss(config_from_dict(raw), num_classes=7)
    assert isinstance(arcface, ArcFace) and (arcface.s, arcface.m, arcface.proxies.shape) == (64.0, 0.5, (7, 16))
    assert torch.equal(arcface.proxies, ArcFace(7, 16, seed=3).proxies)  # seeded by train.seed
    raw["loss"] = {"base": "cosface", "s": 30, "m": 0.2}
    cosface = build_loss(config_from_dict(raw), num_classes=7)
    assert isinstance(cosface, CosFace) and (cosface.s, cosface.m) == (30.0, 0.2)
    raw["loss"] = {"base": "proxy_anchor", "alpha": 16, "delta": 0.2}
    anchor = build_loss(config_from_dict(raw), num_classes=7)
    assert isinstance(anchor, ProxyAnchor) and (anchor.alpha, anchor.delta) == (16.0, 0.2)
    with pytest.raises(ValueError, match="loss.base=proxy_anchor needs num_classes"):
        build_loss(config_from_dict(raw))


def test_lr_schedule_shape():
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and abs(lr_factor(10, 10, 2, "cosine")) < 1e-12
    assert abs(lr_factor(6, 10, 2, "cosine") - 0.5) < 1e-12  # halfway through the decay
    assert lr_factor(9, 10, 0, "constant") == 1.0

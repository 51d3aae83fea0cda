"""Training state round trip: a restored run continues exactly like the uninterrupted one."""
import os

import torch

from dml_core.config import config_from_dict
from dml_core.training.build import build_loss, build_model_from_config, build_optimizer, build_schedule, lr_factor
from dml_core.training.state import (checkpoint_names, load_state, newest_checkpoint, prune_checkpoints,
                                     restore_state, save_state)
from dml_core.training.step import train_step

CFG = config_from_dict({"model": {"backbone": "small_cnn", "embedding_dim": 16, "image_size": 8},
                        "loss": {"base": "decomposable", "tcm": {}}, "data": {"batch_size": 8, "p": 2, "k": 4},
                        "train": {"steps": 6, "warmup_steps": 2, "lr": 1e-2}})


def make():
    torch.manual_seed(0)
    model = build_model_from_config(CFG)
    loss = build_loss(CFG, num_samples=40)
    opt = build_optimizer(CFG, model)
    return model, loss, opt, build_schedule(CFG, opt)


def batches(n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randperm(40, generator=g)[:8]
        yield torch.rand(8, 1, 8, 8, generator=g), ids % 2, ids


def run(model, loss, opt, sched, data):
    return [train_step(model, loss, x, y, i, opt, sched)["loss"] for x, y, i in data]


def test_resume_matches_uninterrupted_run(tmp_path):
    data = list(batches(6))
    ref = make()
    ref_losses = run(*ref, data)

    first = make()
    losses = run(*first, data[:3])
    save_state(str(tmp_path), first[0], first[2], first[3], first[1], step=3, config=CFG.to_dict())
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model.pt", "state.pt"]

    second = make()  # fresh objects: everything must come from the files
    state = load_state(str(tmp_path))
    assert restore_state(state, second[0], second[2], second[3], second[1]) == 3
    assert state["config"] == CFG.to_dict()
    torch.testing.assert_close(second[1].terms[0].zbar, first[1].terms[0].zbar, rtol=0, atol=0)
    assert int(second[1].terms[0].seen.sum()) > 0  # the decomposable state is restored, not reset
    losses += run(*second, data[3:])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(second[0].parameters(), ref[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


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


def test_lr_schedule_shape():
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and abs(lr_factor(10, 10, 2, "cosine")) < 1e-12
    assert abs(lr_factor(6, 10, 2, "cosine") - 0.5) < 1e-12  # halfway through the decay
    assert lr_factor(9, 10, 0, "constant") == 1.0

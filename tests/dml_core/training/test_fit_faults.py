"""`fit` without Ray under faults: a non-finite loss names the config values to suspect; a process killed
after a checkpoint keeps every metrics record up to it (local disk and S3), and after the resume
`read_metrics` gives each step once, from the attempt that survived."""
import multiprocessing as mp
import os
import signal
import uuid

import pytest

from dml_core import storage
from dml_core.training.loop import Worker, fit
from dml_core.training.metrics_log import read_metrics
from tests.tasks._train_helpers import small_config

pytestmark = pytest.mark.slow


def _kill_self_at(kill_step: int):
    def on_step(step, rank):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


def _fit_then_die(cfg, manifest, kill_step: int) -> None:
    fit(cfg, manifest, Worker(on_step=_kill_self_at(kill_step)))


@pytest.mark.parametrize("over, message", [
    ({"train": {"lr": 1e30}}, "embeddings are not finite at step 1; likely causes: train.lr=1e+30 too high, "
                              "loss.tau=0.1 too low, or the data"),
    ({"loss": {"tau": 1e-39}}, "training loss is nan at step 0; likely causes: train.lr=0.002 too high, "
                               "loss.tau=1e-39 too low, or the data"),
])
def test_a_nan_loss_names_the_learning_rate_and_the_temperature(tmp_path, fmnist_shards, over, message):
    over = {"ray": {"num_workers": 1}, **over}
    over["train"] = {"warmup_steps": 0, "checkpoint_every": 100, **over.get("train", {})}
    cfg = small_config(str(tmp_path), fmnist_shards, "nan", steps=6, **over)
    with pytest.raises(FloatingPointError) as e:
        fit(cfg, fmnist_shards["manifest"], Worker())
    assert str(e.value) == message


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_fit_keeps_metrics_to_its_checkpoint_and_the_resume_logs_each_step_once(where, request, tmp_path,
                                                                                        fmnist_shards):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_server").url(f"kill-{uuid.uuid4().hex}")
    cfg = small_config(root, fmnist_shards, "killed", steps=10, ray={"num_workers": 1},
                       train={"checkpoint_every": 5, "log_every": 1})
    metrics = storage.join(cfg.run_dir, "metrics.jsonl")
    child = mp.get_context("spawn").Process(target=_fit_then_die, args=(cfg, fmnist_shards["manifest"], 7))
    child.start()
    child.join(180)
    assert child.exitcode == -signal.SIGKILL  # killed after steps 1-7 were logged, with the checkpoint at 5
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r][:5] == [1, 2, 3, 4, 5]

    second = fit(cfg, fmnist_shards["manifest"], Worker())
    assert (second["start_step"], second["step"]) == (5, 10)
    records = read_metrics(metrics)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))  # each step once
    assert [(r["step"], r["attempt"]) for r in records if "loss" in r] == [(s, 1 + (s > 5)) for s in range(1, 11)]
    assert [(r["event"], r["step"], r["attempt"]) for r in records if "event" in r] == [("started", 0, 1),
                                                                                        ("resumed", 5, 2)]
    logged = [(r["step"], r["attempt"]) for r in read_metrics(metrics, all_attempts=True) if "loss" in r]
    if where == "local":  # every record went to disk as it was logged: the first attempt's 6 and 7 are there
        assert (6, 1) in logged and (7, 1) in logged

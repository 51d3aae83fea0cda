"""Checkpoints and recovery: a worker killed mid-run, resuming a run by name on local disk and on S3,
and a real two-node Ray cluster started with `ray start`."""
from __future__ import annotations

import os

import pytest
import torch

from dml_core import storage
from dml_core.training.metrics_log import read_metrics
from dml_core.training.state import state_digest
from tasks.train import TrainingError, run_training
from tests.tasks._train_helpers import FailAt, KillOnce, small_config

pytestmark = pytest.mark.slow


def checkpoint_state(run_dir: str, step: int) -> dict:
    url = storage.join(run_dir, "checkpoints", f"checkpoint_{step:08d}", "state.pt")
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def loss_digest(state: dict) -> str:
    assert int(state["loss"]["seen"].sum()) > 0  # the decomposable state has content worth restoring
    return state_digest(state["loss"])


def events(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(storage.join(run_dir, "metrics.jsonl")) if "event" in r]


def test_killed_worker_resumes_from_last_checkpoint_with_decomposable_state(tmp_path, fmnist_shards):
    cfg = small_config(str(tmp_path), fmnist_shards, "fault", steps=30, loss={"base": "decomposable"},
                       train={"checkpoint_every": 10})
    marker = str(tmp_path / "killed.marker")
    out = run_training(cfg, on_step=KillOnce(step=15, rank=1, marker=marker))
    assert os.path.exists(marker)
    assert out.final["step"] == 30 and out.metrics["step"] == 30
    assert out.final["start_step"] == 10  # the restarted group began at the last checkpoint

    evs = events(out.run_dir)
    assert [e["event"] for e in evs] == ["started", "resumed"]
    resumed = evs[1]
    assert resumed["step"] == 10
    assert resumed["loss_state_digest"] == loss_digest(checkpoint_state(out.run_dir, 10))  # restored, not reset
    assert out.final["loss_state_digest"] == loss_digest(checkpoint_state(out.run_dir, 30))


def test_an_error_that_would_recur_is_not_retried(tmp_path, fmnist_shards):
    cfg = small_config(str(tmp_path), fmnist_shards, "recur", steps=6, ray={"max_failures": 2})
    log = tmp_path / "raised.log"
    with pytest.raises(TrainingError, match="FloatingPointError: step 2 failed on purpose"):
        run_training(cfg, on_step=FailAt(2, FloatingPointError, str(log)))
    assert log.read_text().count("rank") == 2  # one attempt of 2 ranks; retried, it would be 3 attempts
    assert not [n for n in os.listdir(cfg.run_dir) if n.startswith(".failed")]


def _train_then_resume(root: str, shards: dict):
    first = run_training(small_config(root, shards, "resume", steps=10, loss={"base": "decomposable"},
                                      train={"checkpoint_every": 5}))
    assert first.final["step"] == 10 and first.final["start_step"] == 0
    assert first.checkpoint == storage.join(root, "runs", "resume", "checkpoints", "checkpoint_00000010")
    # The same run name again with more steps: it continues from step 10 with the saved loss state.
    second = run_training(small_config(root, shards, "resume", steps=15, loss={"base": "decomposable"},
                                       train={"checkpoint_every": 5}))
    assert second.final["start_step"] == 10 and second.final["step"] == 15
    resumed = events(second.run_dir)[-1]
    assert resumed["event"] == "resumed"
    assert resumed["loss_state_digest"] == loss_digest(checkpoint_state(second.run_dir, 10))
    state = checkpoint_state(second.run_dir, 15)
    assert state["step"] == 15 and state["config"]["train"]["steps"] == 15
    assert state["scheduler"]["last_epoch"] == 15
    return second


def test_checkpoints_on_local_disk_resume_by_run_name(tmp_path, fmnist_shards):
    out = _train_then_resume(str(tmp_path), fmnist_shards)
    assert os.path.isdir(os.path.join(str(tmp_path), "runs", "resume", "checkpoints", "checkpoint_00000015"))


def test_checkpoints_on_s3_resume_by_run_name(s3_server, fmnist_s3_shards):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # workers of a fresh Ray inherit the S3 credentials the fixture put in the environment
    root = s3_server.url("train-test")
    out = _train_then_resume(root, fmnist_s3_shards)
    fs, path = storage.filesystem(out.checkpoint)
    assert out.checkpoint.startswith("s3://") and fs.exists(path + "/model.pt")


def test_two_node_cluster_places_workers_on_both_nodes(tmp_path, fmnist_shards, ray_cluster):
    cfg = small_config(str(tmp_path), fmnist_shards, "cluster", steps=10, ray={"address": ray_cluster})
    out = run_training(cfg)
    import ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert out.final["step"] == 10
    assert len(out.final["node_ids"]) == 2 and set(out.final["node_ids"]) == nodes and len(nodes) == 2
    ray.shutdown()

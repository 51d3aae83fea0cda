"""`fit` without Ray: a plain process trains, hands its checkpoints to `report`, and a second call of the
same run resumes from the newest one on storage with the loss state it saved."""
import os
import shutil

import pytest

from dml_core.training.loop import Worker, fit
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name, load_state, state_digest
from tests.tasks._train_helpers import small_config

pytestmark = pytest.mark.slow


def keep_checkpoints(run_dir: str, steps: list):
    """A `report` that stores each checkpoint where Ray Train would."""
    def report(metrics, checkpoint_dir):
        steps.append(metrics["step"])
        shutil.copytree(checkpoint_dir, os.path.join(run_dir, CHECKPOINTS, checkpoint_dir_name(metrics["step"])))
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

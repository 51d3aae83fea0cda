"""Training under faults (issue 11, sections 2 and 3), with real processes: a full disk as the run root
(a small tmpfs), an S3 server killed mid-run and restarted, SIGTERM to the driver, and roots that cannot
be written, refused before compute."""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
import uuid

import pytest
import torch

from dml_core import storage
from dml_core.config import ConfigError
from dml_core.training.metrics_log import read_metrics
from dml_core.training.state import CHECKPOINTS, checkpoint_names, load_state
from tasks.train import run_training
from tests.tasks._train_helpers import DescendantWatch, small_config, start_driver

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_temp():
    """A short `ray.temp_dir` for a driver process of the test, removed afterwards."""
    path = f"/tmp/dmlt-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ray_workers(watch: DescendantWatch) -> list[str]:
    return [cmd for cmd in watch.seen.values() if cmd.startswith("ray::RayTrainWorker")]


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def test_a_full_disk_ends_the_run_at_once_with_one_clear_line_and_no_process_left(tmp_path, tmpfs, fmnist_shards,
                                                                                 ray_temp):
    root = tmpfs("1m")
    cfg = small_config(root, fmnist_shards, "full", steps=40, train={"checkpoint_every": 1, "keep_best": 5},
                       ray={"temp_dir": ray_temp, "max_failures": 2})
    t0 = time.monotonic()
    driver = start_driver(cfg, str(tmp_path / "full.yaml"))
    watch = DescendantWatch(driver.pid)
    lines, full_at = [], None
    try:
        for line in driver.stdout:  # the driver ends by itself: the test's own timeout is the backstop
            lines.append(line)
            if full_at is None and "[Errno 28]" in line:
                full_at = time.monotonic()
        driver.wait(timeout=60)
    finally:
        driver.kill()
        watch.stop()
    done = time.monotonic()
    # The driver's own last line: Ray forwards its processes' output ("(RayTrainWorker pid=...) ...") on its
    # own schedule, so a worker's traceback can arrive after it.
    own = [line.strip() for line in lines if not RAY_FORWARDED.match(line)]
    console, last = "".join(lines), own[-1] if own else ""
    assert driver.returncode != 0, console[-3000:]
    assert last.startswith("tasks.train.TrainingError: training stopped, not retried (it would fail again): "
                           f"StorageFullError: [Errno 28] no space left on device writing {root}/runs/full/"), last
    assert " bytes to write, " in last and " bytes free on " in last
    events = [r["event"] for r in read_metrics(os.path.join(root, "runs", "full", "metrics.jsonl")) if "event" in r]
    assert events == ["started"]  # not retried: the restarted worker group stopped before training
    print(f"full disk: driver returned {done - t0:.1f} s after its start, {done - full_at:.1f} s after the "
          f"error; {last}")
    assert done - full_at < 60
    assert ray_workers(watch) and watch.survivors() == []  # no Ray process of the run is left
    checkpoints = os.path.join(root, "runs", "full", CHECKPOINTS)
    for name in checkpoint_names(checkpoints):  # no torn file under a final name
        for file in os.listdir(os.path.join(checkpoints, name)):
            assert file in ("model.pt", "state.pt", "metrics.json"), file
            if file.endswith(".pt"):
                torch.load(os.path.join(checkpoints, name, file), weights_only=True)
    assert os.path.isdir(ray_temp) and os.listdir(root) == ["runs"]  # Ray's files are outside the run root


def test_sigterm_to_the_driver_leaves_no_process_and_the_run_resumes(tmp_path, fmnist_shards, ray_temp):
    cfg = small_config(str(tmp_path), fmnist_shards, "term", steps=30, train={"checkpoint_every": 5},
                       ray={"temp_dir": ray_temp})
    driver = start_driver(cfg, str(tmp_path / "term.yaml"))
    watch = DescendantWatch(driver.pid)
    checkpoints = storage.join(cfg.run_dir, CHECKPOINTS)
    try:
        deadline = time.monotonic() + 300
        while "checkpoint_00000010" not in checkpoint_names(checkpoints):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()[-3000:]
            time.sleep(0.2)
        watch.sample()
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
    finally:
        driver.kill()
        watch.stop()
    assert len(ray_workers(watch)) >= 2 and watch.survivors() == []
    out = run_training(small_config(str(tmp_path), fmnist_shards, "term", steps=30, train={"checkpoint_every": 5}))
    assert out.final["start_step"] >= 10 and out.final["step"] == 30


def test_a_read_only_root_and_a_root_under_a_file_are_refused_before_compute(tmp_path, tmpfs, fmnist_shards):
    read_only = tmpfs("1m", ro=True)
    with pytest.raises(ConfigError, match=f"run.root: storage {read_only}/runs/ro is not writable"):
        run_training(small_config(read_only, fmnist_shards, "ro", steps=5))
    (tmp_path / "a-file").write_text("x")
    under_file = str(tmp_path / "a-file" / "root")
    with pytest.raises(ConfigError, match=f"run.root: storage {under_file}/runs/f is not writable"):
        run_training(small_config(under_file, fmnist_shards, "f", steps=5))


class KillServerAt:
    """A `run_training(on_step=...)` hook: rank 0 SIGKILLs the S3 server's process group at `step`, once."""

    def __init__(self, step: int, pid: int, marker: str) -> None:
        self.step, self.pid, self.marker = step, pid, marker

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.killpg(self.pid, signal.SIGKILL)


def test_an_s3_outage_mid_run_is_ridden_out_and_every_checkpoint_loads(tmp_path, s3_outage_server):
    import ray

    from tests.conftest import _shard_fmnist_tiny

    server = s3_outage_server
    shards = _shard_fmnist_tiny(server.url("outage-data"))
    cfg = small_config(server.url("outage-runs"), shards, "blip", steps=16, train={"checkpoint_every": 4},
                       storage={"endpoint_url": server.endpoint_url})
    outage: dict = {}

    def restart_20s_after_the_kill() -> None:
        while server.proc.poll() is None:
            time.sleep(0.1)
        outage["killed"] = time.monotonic()
        time.sleep(20)
        server.restart()
        outage["back"] = time.monotonic()

    if ray.is_initialized():
        ray.shutdown()  # a fresh Ray: its workers inherit this server's credentials
    watcher = threading.Thread(target=restart_20s_after_the_kill, daemon=True)
    watcher.start()
    try:
        out = run_training(cfg, on_step=KillServerAt(6, server.proc.pid, str(tmp_path / "killed")))
        done = time.monotonic()
    finally:
        ray.shutdown()
        watcher.join(timeout=60)
    assert "back" in outage and done > outage["back"]  # the server really was down for 20 s during the run
    assert out.final["start_step"] == 0 and out.final["step"] == 16  # no restart, by the user or by Ray
    names = checkpoint_names(storage.join(cfg.run_dir, CHECKPOINTS))
    assert names and names[-1] == "checkpoint_00000016"
    for name in names:
        assert load_state(storage.join(cfg.run_dir, CHECKPOINTS, name))["step"] == int(name.split("_")[1])
    steps = [r["step"] for r in read_metrics(storage.join(cfg.run_dir, "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 17))
    print(f"S3 outage: killed at step 6, back {outage['back'] - outage['killed']:.1f} s later; the run finished "
          f"{done - outage['back']:.1f} s after that")

"""Shared pieces of the training tests: a small fast config, a worker-killing step hook, Recall@1."""
from __future__ import annotations

import os
import signal

import torch

from dml_core.config import config_from_dict
from dml_core.training.embed import embed_split

SMALL_CNN = {"backbone": "small_cnn", "embedding_dim": 32, "image_size": 28, "in_channels": 1,
             "backbone_options": {"widths": [16, 32, 64]}}


def small_config(root: str, shards: dict, name: str, steps: int, **over) -> "Config":  # noqa: F821
    raw = {
        "run": {"name": name, "root": root},
        "data": {"dataset": shards["name"], "version": shards["version"], "root": shards["root"],
                 "batch_size": 32, "p": 4, "k": 8},
        "model": dict(SMALL_CNN),
        "loss": {"base": "info_nce", "tau": 0.1},
        "train": {"steps": steps, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": max(1, steps // 2),
                  "keep_best": 5, "log_every": 10, "seed": 0},
        "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 2},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


class KillOnce:
    """A `run_training(on_step=...)` hook: SIGKILL the worker of `rank` at `step`, once (a marker file
    remembers it, so the restarted worker group runs through)."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            f.write(f"killed pid {os.getpid()} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def eval_recall(model, shards: dict) -> float:
    """Leave-one-out Recall@1 over all evaluation-class items (eval + gallery)."""
    from dml_core.metrics import recall_at_k

    zq, lq, _ = embed_split(model, shards["manifest"], "eval")
    zg, lg, _ = embed_split(model, shards["manifest"], "gallery")
    return float(recall_at_k(torch.cat([zq, zg]), torch.cat([lq, lg]), k=1))


class FailAt:
    """A `run_training(on_step=...)` hook: every rank raises `error` at `step`, and logs each raise to `log`."""

    def __init__(self, step: int, error: type[Exception], log: str) -> None:
        self.step, self.error, self.log = step, error, log

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step:
            with open(self.log, "a") as f:
                f.write(f"rank {rank}\n")
            raise self.error(f"step {step} failed on purpose")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_driver(cfg, config_path: str):
    """`run_training` of `cfg` in a fresh driver process, as a user starts it (stdout+stderr piped)."""
    import subprocess
    import sys

    with open(config_path, "w") as f:
        f.write(cfg.to_yaml())
    script = ("from dml_core.config import load_config; from tasks.train import run_training; "
              f"run_training(load_config({config_path!r}))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = REPO
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class DescendantWatch:
    """Every descendant a process has had (sampled in a thread), so a test can check that none outlives it.
    Ray's processes are found by ancestry: workers retitle themselves (`ray::RayTrainWorker`)."""

    def __init__(self, pid: int, interval: float = 0.3) -> None:
        import threading

        import psutil

        self.root, self.interval, self.seen = psutil.Process(pid), interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        import psutil

        try:
            children = self.root.children(recursive=True)
        except psutil.Error:  # the root has ended
            return
        for child in children:
            try:
                self.seen[(child.pid, child.create_time())] = " ".join(child.cmdline())[:80]
            except psutil.Error:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def survivors(self, timeout: float = 20.0) -> list[str]:
        """The recorded descendants still alive after waiting up to `timeout` s for them to end."""
        import time

        deadline = time.monotonic() + timeout
        while (left := [f"{pid} {cmd}" for (pid, created), cmd in self.seen.items() if _alive(pid, created)]) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

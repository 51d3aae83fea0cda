"""One writer per run, with real drivers: two `run_training` processes on one run name started together (one
trains, the other is refused naming it), a dead driver's lease taken over, a live one on S3 refusing, and a
resumed run refusing a config that changes what is trained."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from dml_core import storage
from dml_core.config import ConfigError
from dml_core.training.metrics_log import read_metrics
from tasks.train import run_training
from tests.tasks._train_helpers import small_config

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, sys, time
from tasks.train import run_training
from tests.tasks._train_helpers import small_config
root, shards, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = small_config(root, shards, "shared", steps=12, train={"checkpoint_every": 6})
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):  # both drivers imported and ready: start together
    time.sleep(0.01)
out = run_training(cfg)
print("FINISHED", out.final["step"], flush=True)
"""


def shards_arg(shards: dict) -> str:
    return json.dumps({k: shards[k] for k in ("root", "name", "version")})


def test_two_drivers_on_one_run_one_trains_the_other_is_refused_naming_it(tmp_path, fmnist_shards):
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), shards_arg(fmnist_shards), str(go)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.monotonic() < deadline:  # imports: torch, ray
        time.sleep(0.1)
    go.touch()
    outs = [d.communicate(timeout=400)[0] for d in drivers]
    finished = [i for i, out in enumerate(outs) if "FINISHED 12" in out]
    assert len(finished) == 1, "\n=====\n".join(outs)
    winner, loser = drivers[finished[0]], drivers[1 - finished[0]]
    assert winner.returncode == 0 and loser.returncode != 0
    refusal = outs[1 - finished[0]]
    assert "is in use by another driver" in refusal
    assert f"host {socket.gethostname()}, pid {winner.pid}, since " in refusal and "expires " in refusal
    steps = [r["step"] for r in read_metrics(str(tmp_path / "runs" / "shared" / "metrics.jsonl")) if "event" not in r]
    assert steps == list(range(1, 13))  # each step once
    assert not os.path.exists(tmp_path / "runs" / "shared" / "lease.json")  # released at the end


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def machine_key() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"


def test_a_dead_drivers_expired_lease_is_taken_over_and_logged(tmp_path, fmnist_shards, capfd):
    cfg = small_config(str(tmp_path), fmnist_shards, "stale", steps=4, train={"checkpoint_every": 4})
    os.makedirs(cfg.run_dir)
    old_pid, now = dead_pid(), time.time()
    with open(os.path.join(cfg.run_dir, "lease.json"), "w") as f:
        json.dump({"owner": "dead-driver", "host": socket.gethostname(), "pid": old_pid, "machine": machine_key(),
                   "started": now - 600, "heartbeat": now - 300, "expires": now - 240}, f)
    out = run_training(cfg)
    assert out.final["step"] == 4
    assert f"took over the lease of {cfg.run_dir} from host {socket.gethostname()}, pid {old_pid}" in capfd.readouterr().out
    records = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert records[0]["event"] == "lease_takeover" and records[0]["previous"]["pid"] == old_pid
    assert "expired" in records[0]["reason"] and records[1]["event"] == "started"


HOLD = """
import sys
from dml_core.training.lease import RunLease
with RunLease.acquire(sys.argv[1], 60):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_live_lease_on_s3_refuses_a_second_driver_before_ray_starts(s3_server, fmnist_shards):
    import ray

    cfg = small_config(s3_server.url(f"lease-run-{time.time_ns()}"), fmnist_shards, "s3run", steps=4)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, cfg.run_dir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "held"
        was_up = ray.is_initialized()
        with pytest.raises(RuntimeError, match=f"in use by another driver .host {socket.gethostname()}, "
                                               f"pid {holder.pid}, since "):
            run_training(cfg)
        assert ray.is_initialized() == was_up and not storage.exists(storage.join(cfg.run_dir, "config.yaml"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_resuming_with_a_changed_embedding_dim_is_refused_and_a_longer_run_resumes(tmp_path, fmnist_shards):
    first = run_training(small_config(str(tmp_path), fmnist_shards, "grow", steps=4, train={"checkpoint_every": 4}))
    assert first.final["step"] == 4
    wider = small_config(str(tmp_path), fmnist_shards, "grow", steps=4, train={"checkpoint_every": 4},
                         model={"embedding_dim": 48})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"model\.embedding_dim: saved 32, new 48") as e:
        run_training(wider)
    assert time.monotonic() - t0 < 20  # refused before Ray trains (no retries of a size mismatch)
    assert "run.allow_config_change" in str(e.value) and "new run.name" in str(e.value)
    saved = yaml.safe_load(storage.read_bytes(os.path.join(first.run_dir, "config.yaml")))
    assert saved["model"]["embedding_dim"] == 32  # the saved config still describes the checkpoints
    longer = run_training(small_config(str(tmp_path), fmnist_shards, "grow", steps=6, train={"checkpoint_every": 4}))
    assert longer.final["start_step"] == 4 and longer.final["step"] == 6
    wider.run.fresh_start = True  # the explicit override: the 32-dim run is set aside, the 48-dim one starts at 0
    fresh = run_training(wider)
    assert fresh.final["start_step"] == 0 and fresh.final["step"] == 4
    (aside,) = [n for n in storage.list_names(first.run_dir) if n.startswith("replaced-")]
    old = yaml.safe_load(storage.read_bytes(os.path.join(first.run_dir, aside, "config.yaml")))
    assert old["model"]["embedding_dim"] == 32 and storage.exists(os.path.join(first.run_dir, aside, "checkpoints"))

"""A Ray cluster of several nodes on one machine, each node started by infra/ray-head.sh or infra/ray-worker.sh
as on a real cluster, in its own process group (stopping it never touches other Ray processes here). Used by
the tests' two-node cluster and by experiment 5."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

INFRA = os.path.dirname(os.path.abspath(__file__))


def node_env() -> dict:
    """The environment of the nodes and of a driver joining them: explicit token auth (Ray >= 2.5x turns it on
    for local clusters when ~/.ray/auth_token exists, but a joining node only uses it when told)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1",
               RAY_agent_register_timeout_ms="120000", RAY_raylet_start_wait_time_s="120")
    env.pop("RAY_ADDRESS", None)
    return env


def start_node(script: str, args: list[str], log_path: str, env: dict):
    """(process, log file) of a node started by infra/<script>; FileNotFoundError without the `ray` command."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise FileNotFoundError("the `ray` command is not installed beside this Python")
    log = open(log_path, "wb")
    # The script execs `ray start --block`, so the node stays in the foreground; its own process group lets a
    # caller stop exactly these nodes (never `ray stop`, which would kill every Ray process on a shared machine).
    return subprocess.Popen(["bash", os.path.join(INFRA, script), *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**env, "RAY_BIN": ray_bin}, start_new_session=True), log


def wait_for_nodes(address: str, n: int, nodes: list, logs, timeout: float = 90.0) -> None:
    """Poll the cluster (in a subprocess, so this process stays unconnected) until `n` nodes are alive."""
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, _ in nodes:
            if proc.poll() is not None:
                raise RuntimeError(f"a `ray start` process exited with {proc.returncode}; logs in {logs}")
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                             env=node_env(), timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise TimeoutError(f"Ray cluster at {address} did not reach {n} nodes in {timeout}s; logs in {logs}")

"""The run lease on local disk and on a real SeaweedFS server: a live holder (another real process) refuses a
second driver naming it; a gone holder's lease is taken over and the takeover logged; the heartbeat keeps
a lease alive past its expiry; a driver whose lease was taken over knows it and does not delete the new one."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from dml_core import conditional, storage
from dml_core.training.lease import Holder, LeaseHeldError, RunLease, machine_id
from dml_core.training.metrics_log import read_metrics


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    server = request.getfixturevalue("s3_server")
    return server.url(f"lease-test/{request.node.name.replace('[', '-').rstrip(']')}/{time.time_ns()}")


HOLD = """
import sys
from dml_core.training.lease import RunLease
with RunLease.acquire(sys.argv[1], 30):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_live_holder_in_another_process_refuses_a_second_driver(run_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeldError) as e:
            RunLease.acquire(run_dir, 30)
        msg = str(e.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}, since " in msg and "expires " in msg
        assert storage.join(run_dir, "lease.json") in msg
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert conditional.read(storage.join(run_dir, "lease.json")) is None  # released at the end
    with RunLease.acquire(run_dir, 30):  # and free again
        pass


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def write_lease(run_dir: str, pid: int, expires_in: float, machine: str) -> Holder:
    now = time.time()
    holder = Holder("old-owner", "old-host", pid, machine, now - 100, now - 50, now + expires_in)
    assert conditional.create(storage.join(run_dir, "lease.json"), json.dumps(holder.__dict__).encode())
    return holder


@pytest.mark.parametrize("stale", ["expired", "dead_pid"])
def test_a_gone_holders_lease_is_taken_over_and_logged(run_dir, stale, capsys):
    if stale == "expired":  # another machine's holder that stopped beating: only the expiry counts
        old = write_lease(run_dir, pid=1, expires_in=-5, machine="another-machine")
    else:  # this machine's holder whose process died (SIGKILL, power cut of the driver): no need to wait
        old = write_lease(run_dir, pid=dead_pid(), expires_in=600, machine=machine_id())
    with RunLease.acquire(run_dir, 30) as lease:
        assert json.loads(storage.read_bytes(lease.url))["owner"] == lease.holder.owner
    out = capsys.readouterr().out
    assert f"took over the lease of {run_dir} from host old-host, pid {old.pid}" in out
    (event,) = [r for r in read_metrics(storage.join(run_dir, "metrics.jsonl")) if r.get("event") == "lease_takeover"]
    assert event["previous"]["pid"] == old.pid and event["previous"]["owner"] == "old-owner"
    assert ("expired" in event["reason"]) == (stale == "expired")


def test_a_live_holder_on_another_machine_is_not_taken_over_before_expiry(run_dir):
    write_lease(run_dir, pid=dead_pid(), expires_in=600, machine="another-machine")  # its pids are not ours
    with pytest.raises(LeaseHeldError, match="host old-host, pid"):
        RunLease.acquire(run_dir, 30)


def test_the_heartbeat_keeps_the_lease_past_its_expiry(run_dir):
    with RunLease.acquire(run_dir, 1.5) as lease:
        time.sleep(4)
        with pytest.raises(LeaseHeldError):
            RunLease.acquire(run_dir, 1.5)
        assert lease.holder.heartbeat > lease.holder.started + 2 and lease.lost is None


def test_a_driver_whose_lease_was_taken_over_knows_and_leaves_it(run_dir):
    first = RunLease.acquire(run_dir, 1)  # not entered: no heartbeat, as if the driver stalled
    time.sleep(1.3)
    with RunLease.acquire(run_dir, 30) as second:
        first.renew()
        assert first.lost and f"pid {second.holder.pid}" in first.lost
        first.release()  # must not delete the new holder's lease
        assert json.loads(storage.read_bytes(second.url))["owner"] == second.holder.owner

"""The run lease: one writer per run directory, on local disk and on S3.

`<run_dir>/lease.json` names its holder (owner id, host, pid, start, last heartbeat, expiry). A driver
takes it before anything else writes to the run, renews it from a heartbeat thread every third of
`run.lease_seconds`, and deletes it at the end. Another driver is refused while the lease is alive; a lease
whose heartbeat has expired, or whose holder process is gone from this machine, is taken over and the
takeover logged (console and a `lease_takeover` event in `metrics.jsonl`).

Guarantee: every change is a compare-and-swap (`dml_core.conditional`), so on a local disk and on S3
servers with conditional requests exactly one of two racing drivers gets the lease. Expiry compares wall
clocks: the hosts sharing a run root must agree on the time to well within `run.lease_seconds`.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from dml_core import conditional, storage

LEASE = "lease.json"
HEARTBEATS_PER_LEASE = 3
READ_BACK_SETTLE_S = 0.2  # before reading a new lease back: a server that ignored If-None-Match shows it here


class LeaseHeldError(RuntimeError):
    """Another live driver holds the run's lease."""


class LeaseLostError(RuntimeError):
    """This driver's lease was taken over while it ran (its heartbeat stalled past the expiry)."""


def machine_id() -> str:
    """Boot id and pid namespace: two processes with equal ids see the same pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""  # unknown: a holder's pid is never checked, only its expiry


@dataclass
class Holder:
    owner: str
    host: str
    pid: int
    machine: str
    started: float
    heartbeat: float
    expires: float

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, since {_utc(self.started)}, last heartbeat "
                f"{_utc(self.heartbeat)}, expires {_utc(self.expires)}")

    def gone(self, now: float) -> str | None:
        """Why the holder counts as gone (expired, or its process is dead on this machine), or None."""
        if now > self.expires:
            return f"its heartbeat expired at {_utc(self.expires)}"
        if self.machine and self.machine == machine_id() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this machine is gone"
        return None


class RunLease:
    """`with RunLease.acquire(run_dir, seconds):` holds the run for the body, heartbeat included."""

    def __init__(self, url: str, holder: Holder, token: str, seconds: float) -> None:
        self.url, self.holder, self.token, self.seconds = url, holder, token, seconds
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: str, seconds: float) -> "RunLease":
        """Take the lease of `run_dir` or raise `LeaseHeldError` naming its live holder."""
        url = storage.join(run_dir, LEASE)
        now = time.time()
        mine = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), machine_id(), now, now, now + seconds)
        current = conditional.read(url)  # first, so a server without If-None-Match never overwrites a live lease
        if current is None:
            if conditional.create(url, _encode(mine)) is None:  # another driver was faster
                raise LeaseHeldError(_held_message(run_dir, url, _holder(url)))
            return cls(url, mine, _confirm(run_dir, url, mine), seconds)
        previous = _decode(url, current.data)
        why = previous.gone(time.time())
        if why is None:
            raise LeaseHeldError(_held_message(run_dir, url, previous))
        if conditional.replace(url, _encode(mine), current.token) is None:  # another driver took it over first
            raise LeaseHeldError(_held_message(run_dir, url, _holder(url)))
        lease = cls(url, mine, _confirm(run_dir, url, mine), seconds)
        log_takeover(run_dir, previous, why)
        return lease

    def __enter__(self) -> "RunLease":
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def renew(self) -> None:
        """Push the expiry `seconds` ahead; sets `lost` if another driver took the lease over."""
        now = time.time()
        new = Holder(**{**asdict(self.holder), "heartbeat": now, "expires": now + self.seconds})
        token = conditional.replace(self.url, _encode(new), self.token)
        if token is not None:
            self.holder, self.token = new, token
            return
        taker = _holder(self.url)
        self.lost = f"the lease {self.url} was taken over by {taker.describe() if taker else 'nobody (deleted)'}"
        print(f"[lease] ERROR: {self.lost}; this run is no longer the only writer", flush=True)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            try:
                conditional.delete(self.url, self.token)
            except Exception as e:  # never hide the run's own outcome; the lease expires by itself
                print(f"[lease] could not release {self.url} ({type(e).__name__}: {e}); it expires at "
                      f"{_utc(self.holder.expires)}", flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / HEARTBEATS_PER_LEASE) and self.lost is None:
            try:
                self.renew()
            except Exception as e:  # storage unreachable: keep trying until the lease would expire
                print(f"[lease] heartbeat of {self.url} failed ({type(e).__name__}: {e}); retrying", flush=True)


def log_takeover(run_dir: str, previous: Holder, why: str) -> None:
    """Say on the console and in metrics.jsonl that a gone holder's lease was taken over."""
    from dml_core.training.metrics_log import MetricsLog

    print(f"[lease] took over the lease of {run_dir} from {previous.describe()}: {why}", flush=True)
    log = MetricsLog(storage.join(run_dir, "metrics.jsonl"))
    log.log({"event": "lease_takeover", "reason": why, "previous": asdict(previous), "by_host": socket.gethostname(),
             "by_pid": os.getpid(), "time": time.time()})
    log.close()


def _confirm(run_dir: str, url: str, mine: Holder) -> str:
    """Read the lease back after a short settle; the token of this driver's lease, or raise if it is not."""
    time.sleep(READ_BACK_SETTLE_S)
    current = conditional.read(url)
    holder = _decode(url, current.data) if current else None
    if holder is None or holder.owner != mine.owner:
        raise LeaseHeldError(_held_message(run_dir, url, holder))
    return current.token


def _holder(url: str) -> Holder | None:
    current = conditional.read(url)
    return _decode(url, current.data) if current else None


def _held_message(run_dir: str, url: str, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a driver that has since released it"
    return (f"run {run_dir} is in use by another driver ({who}); its lease is {url}. Wait for it to finish, "
            f"or use another run.name. A lease whose holder died is taken over once it expires.")


def _encode(holder: Holder) -> bytes:
    return (json.dumps(asdict(holder), indent=1) + "\n").encode()


def _decode(url: str, data: bytes) -> Holder:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError) as e:
        raise LeaseHeldError(f"{url} is not a run lease ({e}); remove it if no driver is using the run") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")

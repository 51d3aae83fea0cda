"""Long-lived helper servers (SeaweedFS, a Prefect server) run as child processes in their own session:
they die with the process that started them, and stopping one stops its whole process group."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child before exec (Linux): get `sig` when the starting thread's process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def stop_group(proc: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL if it has not ended after `grace` seconds."""
    stop_groups([proc], grace)


def stop_groups(procs: list[subprocess.Popen | None], grace: float = 20.0) -> None:
    """`stop_group` for several groups at once: all are signalled, then all get the same `grace`."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

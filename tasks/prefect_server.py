"""A local Prefect server (`prefect server start`) as a child process on 127.0.0.1, for scheduled runs when
no PREFECT_API_URL is set (the ephemeral API cannot schedule) and for local multi-node setups:

    with PrefectServer(home="~/.dml/prefect") as server:   # a free port; its SQLite database under `home`
        ...server.api_url...

`python -m tasks.prefect_server --home DIR [--port N]` runs one until Ctrl-C (infra/prefect-server.sh).
The server runs in its own session and, with die_with_parent (Linux), stops when this process dies.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dml_core.child_process import die_with_parent, stop_group


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PrefectServer:
    """Start, wait for and stop a Prefect server whose home (database, logs) is `home`."""

    def __init__(self, home: str, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 180.0, die_with_parent: bool = True) -> None:
        self.home = Path(home).expanduser().resolve()
        self.host, self.port = host, port
        self.startup_timeout, self.die_with_parent = startup_timeout, die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED=env.get("PREFECT_SERVER_UI_ENABLED", "false"))
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent if self.die_with_parent else None)
        atexit.register(self.stop)  # never an orphan server (it runs in its own session)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Prefect server at {self.api_url} was not healthy after {self.startup_timeout:g} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not ended after 20 s."""
        stop_group(self.proc)
        self.proc = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a server until Ctrl-C or SIGTERM."""
    import argparse

    ap = argparse.ArgumentParser(description="A local Prefect server for scheduled runs and multi-node setups.")
    ap.add_argument("--home", default="~/.dml/prefect", help="its database and log (default: %(default)s)")
    ap.add_argument("--host", default="127.0.0.1", help="listen address; 0.0.0.0 for other machines")
    ap.add_argument("--port", type=int, default=4200)
    args = ap.parse_args(argv)
    with PrefectServer(args.home, host=args.host, port=args.port, die_with_parent=False) as server:
        print(f"Prefect server is up; in the shells that use it: export PREFECT_API_URL={server.api_url}")
        print(f"log: {server.log_path}; Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

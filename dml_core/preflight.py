"""Checks a command makes before any compute: is the storage root of a run there and writable.

Each failure is a `PreflightError` whose message is one line naming the config field and the root, so a
typo in `run.root` or a bucket that does not exist stops `dml` at once, not after Ray has started. An S3
root is probed with short timeouts and no retries: the storage retry window is for outages mid-run. (The
training driver's own write probe, `dml_core.training.preflight.check_storage`, still runs when training starts.)
"""
from __future__ import annotations

import os

from dml_core import storage

S3_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """A storage root, service or input file a command needs is missing or unreachable; the message names it."""


def check_storage_root(url: str, endpoint_url: str | None = None, field: str = "run.root") -> None:
    """Raise PreflightError unless `url` can hold the run: a local folder (or its parent) that exists and is
    writable, or an S3 bucket that answers."""
    if storage.is_local(url):
        _check_local(storage.local_path(url), field)
    else:
        _check_s3(url, endpoint_url, field)


def _check_local(path: str, field: str) -> None:
    target = path
    if not os.path.exists(path):
        target = os.path.dirname(path.rstrip("/")) or "/"
        if not os.path.isdir(target):
            raise PreflightError(f"{field}: storage root {path} cannot be created: its parent folder {target} "
                                 "does not exist")
    elif not os.path.isdir(path):
        raise PreflightError(f"{field}: storage root {path} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise PreflightError(f"{field}: storage root {path} is not writable (no write permission on {target})")


def _check_s3(url: str, endpoint_url: str | None, field: str) -> None:
    if not url.startswith("s3://"):
        return  # other fsspec protocols: left to the first read or write
    import fsspec

    bucket = url[len("s3://"):].split("/", 1)[0]
    options = storage.s3_options(url, endpoint_url)
    endpoint = options.get("client_kwargs", {}).get("endpoint_url", "AWS")
    options["config_kwargs"] = {"connect_timeout": S3_TIMEOUT_S, "read_timeout": S3_TIMEOUT_S,
                                "retries": {"max_attempts": 1}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    where = f"{field}: storage root {url}: bucket {bucket!r} at {endpoint}"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as e:
        raise PreflightError(f"{where} does not exist") from e
    except PermissionError as e:
        raise PreflightError(f"{where} refuses access (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from e
    except Exception as e:  # no answer at all: wrong endpoint, server down, network
        raise PreflightError(f"{where} cannot be reached: {type(e).__name__}: {e}") from e

"""One storage interface for local paths, `file://` and `s3://` URLs (through fsspec / s3fs).

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never logged.
An S3-compatible endpoint (SeaweedFS, MinIO) is given per call with `endpoint_url=`, or for a whole
process tree with AWS_ENDPOINT_URL, the variable the AWS tools read (subprocesses such as DataLoader and
Ray workers inherit it); there is no other hidden state.
"""
from __future__ import annotations

import os
import uuid

import fsspec

ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def use_endpoint(endpoint_url: str | None) -> None:
    """Point this process and the ones it starts at an S3 endpoint (sets AWS_ENDPOINT_URL); None keeps it."""
    if endpoint_url:
        os.environ[ENDPOINT_ENV] = endpoint_url


def is_local(url: str) -> bool:
    """True for a plain path or a `file://` URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The absolute filesystem path of a local `url` (see `is_local`)."""
    if not is_local(url):
        raise ValueError(f"{url} is not a local path")
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def s3_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `url`: the S3 endpoint (`endpoint_url`, else AWS_ENDPOINT_URL) for s3:// URLs."""
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV)
    if not url.startswith("s3://") or not endpoint:
        return {}
    return {"client_kwargs": {"endpoint_url": endpoint}}


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    return fsspec.core.url_to_fs(url, **s3_options(url, endpoint_url))


def open_read(url: str, endpoint_url: str | None = None):
    """A binary file object reading `url`."""
    fs, path = filesystem(url, endpoint_url)
    return fs.open(path, "rb")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name beside the target, then move it into place.

    On a local disk the rename is atomic. On S3 the object appears only once its upload has
    completed, so readers never see a partial object either way.
    """
    with open_write_atomic(url) as f:
        f.write(data)


def open_write_atomic(url: str):
    """Context manager yielding a writable file that lands at `url` only when closed cleanly."""
    return _AtomicWriter(url)


class _AtomicWriter:
    def __init__(self, url: str) -> None:
        self.fs, self.path = filesystem(url)
        self.tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"

    def __enter__(self):
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.file = self.fs.open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None:
            self.fs.mv(self.tmp, self.path)
        else:
            self.fs.rm(self.tmp)
        return False

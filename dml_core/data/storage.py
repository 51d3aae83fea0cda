"""One storage interface for local paths and `s3://` (through s3fs), plus WebDataset's s3 scheme.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never logged;
an S3-compatible endpoint (SeaweedFS, MinIO) is set with `endpoint_url` or AWS_ENDPOINT_URL.
"""
from __future__ import annotations

import os
import uuid

import fsspec

_DEFAULT_OPTIONS: dict = {}


def configure(endpoint_url: str | None = None, **s3_options) -> None:
    """Set process-wide S3 options (call in every process that reads or writes, Ray workers included)."""
    _DEFAULT_OPTIONS.clear()
    if endpoint_url:
        _DEFAULT_OPTIONS["client_kwargs"] = {"endpoint_url": endpoint_url}
    _DEFAULT_OPTIONS.update(s3_options)
    register_webdataset_schemes()


def storage_options(url: str) -> dict:
    if not url.startswith("s3://"):
        return {}
    opts = dict(_DEFAULT_OPTIONS)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "client_kwargs" not in opts:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name beside the target, then move it into place.

    On a local disk the rename is atomic. On S3 the object appears only once its upload has
    completed, so readers never see a partial object either way.
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


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


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    fs, path = filesystem(url)
    return fs.open(path, mode)


def register_webdataset_schemes(allow_pipe: bool = False) -> None:
    """Let WebDataset open `s3://` through fsspec; disable `pipe:` URLs unless explicitly allowed."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # `from webdataset import gopen` is the function

    gopen.gopen_schemes["s3"] = _gopen_fsspec
    if not allow_pipe:
        gopen.gopen_schemes["pipe"] = _refuse_pipe


def _refuse_pipe(url, *args, **kw):
    raise ValueError(f"shell 'pipe:' URLs are disabled ({url.split()[0]}...); set allow_pipe: true in the config to use them")

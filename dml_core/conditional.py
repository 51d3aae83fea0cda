"""Compare-and-swap on one small object, local or on S3: the primitive under the run lease.

`read` returns the bytes and a version token; `create` writes only if nothing is there; `replace` and
`delete` act only if the object still has the token read. Writes return the new token, or None when they
lost a race; `delete` returns False then.

Local disk: every change holds an exclusive `flock` on `<path>.lock` (advisory, taken by every writer
here), the new bytes land by rename, and the token is their sha256. S3: conditional requests, `PUT` with
`If-None-Match: *` or `If-Match: <etag>`, `DELETE` with `If-Match` (AWS S3 since 2024, MinIO, SeaweedFS:
`tests/dml_core/test_conditional.py` checks the server in use). A server that ignores these headers
would let a concurrent `create` overwrite; callers read back what they wrote to detect it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import NamedTuple

from dml_core import storage

# What S3 answers when a condition does not hold: 412, or 409 for a concurrent conditional write (AWS).
LOST_RACE_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class Versioned(NamedTuple):
    data: bytes
    token: str


def read(url: str) -> Versioned | None:
    """The object's bytes and version token, or None when there is none."""
    if storage.is_local(url):
        try:
            with open(storage.local_path(url), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Versioned(data, hashlib.sha256(data).hexdigest())
    fs, bucket, key = _s3(url)
    from fsspec.asyn import sync

    try:
        return sync(fs.loop, _s3_get, fs, bucket, key)
    except FileNotFoundError:
        return None


def create(url: str, data: bytes) -> str | None:
    """Write `data` at `url` if no object is there; its token, or None if one is."""
    if storage.is_local(url):
        with _locked(url):
            if os.path.exists(storage.local_path(url)):
                return None
            return _local_write(url, data)
    return _s3_put(url, data, IfNoneMatch="*")


def replace(url: str, data: bytes, token: str) -> str | None:
    """Write `data` at `url` if the object there still has version `token`; the new token, or None."""
    if storage.is_local(url):
        with _locked(url):
            if _local_token(url) != token:
                return None
            return _local_write(url, data)
    return _s3_put(url, data, IfMatch=token)


def delete(url: str, token: str) -> bool:
    """Delete the object at `url` if it still has version `token`; False otherwise."""
    if storage.is_local(url):
        with _locked(url):
            if _local_token(url) != token:
                return False
            os.remove(storage.local_path(url))
            return True
    return _s3_call(url, "delete_object", IfMatch=token) is not None


# ---------------------------------------------------------------- local ------------------------

@contextlib.contextmanager
def _locked(url: str):
    path = storage.local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _local_write(url: str, data: bytes) -> str:
    storage.write_bytes_atomic(url, data)
    return hashlib.sha256(data).hexdigest()


def _local_token(url: str) -> str | None:
    found = read(url)
    return found.token if found else None


# ---------------------------------------------------------------- S3 ---------------------------

def _s3(url: str):
    fs, path = storage.filesystem(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


async def _s3_get(fs, bucket: str, key: str) -> Versioned:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        data = await resp["Body"].read()
    finally:
        resp["Body"].close()
    return Versioned(data, resp["ETag"])  # bytes and ETag of one response: they belong together


def _s3_put(url: str, data: bytes, **condition) -> str | None:
    response = _s3_call(url, "put_object", Body=data, **condition)
    return None if response is None else response["ETag"]


def _s3_call(url: str, method: str, **kwargs) -> dict | None:
    """The response of `method` on the object at `url`, or None when its condition did not hold."""
    fs, bucket, key = _s3(url)
    try:
        return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
    except OSError as e:  # FileExistsError included
        if _lost_race(e):
            return None
        raise
    finally:
        fs.invalidate_cache(f"{bucket}/{key}")


def _lost_race(e: BaseException) -> bool:
    """True for a failed condition (s3fs translates it into FileExistsError or OSError(EINVAL))."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    error, meta = response.get("Error", {}), response.get("ResponseMetadata", {})
    return error.get("Code") in LOST_RACE_CODES or str(meta.get("HTTPStatusCode")) in LOST_RACE_CODES

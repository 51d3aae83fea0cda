"""Riding out a storage outage: which errors heal by themselves (connection refused or reset, timeouts, a
server's 5xx) and a backoff loop that retries them for `storage.retry_seconds` before giving up.

Errors that no wait will fix (a missing object, a permission, a full disk) are raised at once. The window
is read from DML_STORAGE_RETRY_SECONDS, so DataLoader and Ray worker processes inherit it.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import time
from typing import Callable, TypeVar

RETRY_ENV = "DML_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
FIRST_DELAY, MAX_DELAY = 0.5, 10.0
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}

log = logging.getLogger(__name__)
T = TypeVar("T")
_window: contextvars.ContextVar[float | None] = contextvars.ContextVar("storage_retry_window", default=None)


class StorageUnavailableError(OSError):
    """Storage stayed unreachable for the whole retry window; the message names the URL."""


def use_retry_seconds(seconds: float | None) -> None:
    """Set the retry window of this process and the ones it starts; None keeps it."""
    if seconds is not None:
        os.environ[RETRY_ENV] = repr(float(seconds))


def retry_seconds() -> float:
    window = _window.get()
    return window if window is not None else float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_SECONDS))


@contextlib.contextmanager
def retry_window(seconds: float):
    """Within the block (this thread or task), retry for `seconds` instead (0: fail at the first error)."""
    token = _window.set(float(seconds))
    try:
        yield
    finally:
        _window.reset(token)


def _connection_error_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as b

        types += [b.ConnectionError, b.HTTPClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(types)


def _server_error(e: BaseException) -> bool:
    status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return isinstance(status, int) and status >= 500


def is_transient(e: BaseException) -> bool:
    """True for errors a working storage would not give again: lost connections, timeouts, 5xx answers."""
    if isinstance(e, (StorageUnavailableError, *PERMANENT)) or getattr(e, "errno", None) in PERMANENT_ERRNOS:
        return False
    connection, seen = _connection_error_types(), set()
    while e is not None and id(e) not in seen:  # s3fs wraps the client's error: look down the chain
        seen.add(id(e))
        if isinstance(e, connection) or _server_error(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def retrying(url: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)`, retried with exponential backoff while it fails transiently, at most for the
    retry window; then `StorageUnavailableError` naming `url`."""
    window = retry_seconds()
    deadline, delay, warned = time.monotonic() + window, FIRST_DELAY, False
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailableError(
                    errno.EHOSTUNREACH, f"storage unreachable for {window:g} s (storage.retry_seconds) at {url}: "
                                        f"{type(e).__name__}: {e}") from e
            if not warned:
                log.warning("storage error at %s, retrying for up to %.0f s: %s: %s", url, left, type(e).__name__, e)
                warned = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_DELAY)
            continue
        if warned:
            log.warning("storage at %s reachable again", url)
        return result

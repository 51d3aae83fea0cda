"""Checks before any compute that the services a run joins answer: the Ray cluster at `ray.address` (a TCP
connect to its GCS port) and the Prefect API at PREFECT_API_URL (its /health). Each failure is one line
naming the address, in seconds, instead of Ray's or Prefect's own retries and tracebacks minutes later."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

from dml_core.preflight import PreflightError

TIMEOUT_S = 3.0
PREFECT_ENV = "PREFECT_API_URL"


def check_ray_address(address: str | None, timeout: float = TIMEOUT_S) -> None:
    """Raise PreflightError unless the Ray head at `address` ("host:port" or "ray://host:port") accepts a
    connection; None (in-process Ray) and "auto" (Ray finds a local cluster itself) are not checked."""
    if not address or address == "auto":
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PreflightError(f"ray.address {address!r} must be host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise PreflightError(f"ray.address {address}: no Ray cluster answers there ({_reason(e)}); start one "
                             "(`ray start --head`) or set ray.address: null for an in-process Ray") from e


def check_prefect_api(url: str | None = None, timeout: float = TIMEOUT_S) -> None:
    """Raise PreflightError unless the Prefect API at `url` (default: PREFECT_API_URL; unset means Prefect's
    ephemeral API, not checked) answers its /health."""
    url = url if url is not None else os.environ.get(PREFECT_ENV)
    if not url:
        return
    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        raise PreflightError(f"{PREFECT_ENV} {url}: the Prefect API does not answer ({_reason(e)}); start it "
                             f"(`prefect server start`) or unset {PREFECT_ENV} for the ephemeral API") from e
    if status != 200:
        raise PreflightError(f"{PREFECT_ENV} {url}: {health} answered HTTP {status}, not a healthy Prefect API")


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or e
    return str(getattr(reason, "strerror", None) or reason) or type(e).__name__

"""`metrics.jsonl`: one JSON object per line, appended as training goes.

Local files are opened with O_APPEND and each record is one `write` of one line, so concurrent or
interrupted writers never interleave or leave half a line behind a complete one. Object stores cannot
append: there the whole file is rewritten atomically on `flush()` (every `flush_every` records).
"""
from __future__ import annotations

import json
import math
import os

from dml_core import storage


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class MetricsLog:
    def __init__(self, url: str, flush_every: int = 20) -> None:
        self.url, self.flush_every = url, flush_every
        self.local = storage.is_local(url)
        self._pending: list[str] = []
        if self.local:
            path = storage.local_path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            self._lines = storage.read_bytes(url).decode().splitlines(keepends=True) if storage.exists(url) else []

    def log(self, record: dict) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False) + "\n"
        if self.local:
            os.write(self._fd, line.encode())
        else:
            self._pending.append(line)
            if len(self._pending) >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        if not self.local and self._pending:
            self._lines += self._pending
            self._pending = []
            storage.write_bytes_atomic(self.url, "".join(self._lines).encode())

    def close(self) -> None:
        self.flush()
        if self.local and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_metrics(url: str) -> list[dict]:
    """All records of a metrics.jsonl (local path or URL)."""
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]

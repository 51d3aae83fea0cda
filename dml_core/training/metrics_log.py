"""`metrics.jsonl`: one JSON object per line, appended as training goes.

Local files are opened with O_APPEND and each record is one `write` of one line, so concurrent or
interrupted writers never interleave or leave half a line behind a complete one. Object stores cannot
append: there the whole file is rewritten atomically on `flush()` (every `flush_every` records, and by the
training loop before every checkpoint, so a resume finds every step up to its checkpoint).

Every record carries its `attempt`: one more than the highest attempt already in the file when the log is
opened (each start or resume of a run opens it once). A resumed attempt's first record is the event
`{"event": "resumed", "step": s}`. The records an earlier attempt wrote past `s` (after the checkpoint it
resumed from, up to the crash) stay in the file on local disk and on S3 alike; `read_metrics` drops them,
so it gives each step once, from the attempt whose work survived. `read_metrics(url, all_attempts=True)`
gives the file as it is.
"""
from __future__ import annotations

import errno
import json
import math
import os

from dml_core import storage

START_EVENTS = ("started", "resumed")  # an attempt's first record; its `step` is where the attempt began


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class MetricsLog:
    def __init__(self, url: str, flush_every: int = 20) -> None:
        self.url, self.flush_every = url, flush_every
        self.local = storage.is_local(url)
        self._pending: list[str] = []
        text = storage.read_bytes(url).decode() if storage.exists(url) else ""
        self.attempt = 1 + max((r.get("attempt", 0) for r in _parse(text)), default=0)
        if self.local:
            path = storage.local_path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            self._lines = text.splitlines(keepends=True)

    def log(self, record: dict) -> None:
        record = {**record, "attempt": self.attempt}
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False) + "\n"
        if self.local:
            try:
                os.write(self._fd, line.encode())
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise storage.no_space(storage.local_path(self.url), len(line)) from e
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


def read_metrics(url: str, all_attempts: bool = False) -> list[dict]:
    """The records of a metrics.jsonl (local path or URL), in file order: every step record once, from
    the attempt that survived (see the module docstring); with `all_attempts`, every record in the file."""
    records = _parse(storage.read_bytes(url).decode()) if storage.exists(url) else []
    return records if all_attempts else superseded_dropped(records)


def superseded_dropped(records: list[dict]) -> list[dict]:
    """`records` without the step records of an attempt past the step a later attempt started from.

    Events are all kept. Records without an `attempt` (older files) count as attempt 0."""
    began = {r.get("attempt", 0): r["step"] for r in records if r.get("event") in START_EVENTS}
    cuts = {a: min((s for b, s in began.items() if b > a), default=math.inf)
            for a in {r.get("attempt", 0) for r in records}}
    return [r for r in records if "event" in r or "step" not in r or r["step"] <= cuts[r.get("attempt", 0)]]


def _parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]

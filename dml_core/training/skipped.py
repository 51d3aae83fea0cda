"""What a run skipped with `data.on_error: skip`: shard reads and samples, summed over ranks and over
restarts (the counts travel in the checkpoint metrics), logged to `metrics.jsonl` and the console."""
from __future__ import annotations

import torch.distributed as dist

from dml_core.data.shard_stream import ErrorLog

KEYS = ("skipped_shards", "skipped_samples")
SHOWN = 5  # messages per kind in one log record


class SkippedData:
    """Rank-local `errors` (filled by the reader) and the run's totals, updated at every checkpoint."""

    def __init__(self, resumed_metrics: dict | None = None) -> None:
        self.errors = ErrorLog()
        metrics = resumed_metrics or {}
        self.shards, self.samples = (int(metrics.get(k, 0)) for k in KEYS)

    def counts(self) -> dict[str, int]:
        return {"skipped_shards": self.shards, "skipped_samples": self.samples}

    def collect(self, world: int, step: int, log=None) -> dict[str, int]:
        """On every rank at a checkpoint: gather the errors since the last one onto rank 0, add them to the
        totals, log them there (`log` is rank 0's MetricsLog); returns the totals."""
        new = self.errors.take()
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, new)
            new = ErrorLog()
            for part in parts:
                new.extend(part)
        self.shards += len(new.shards)
        self.samples += len(new.samples)
        if log is not None and (new.shards or new.samples):
            log.log({"event": "skipped", "step": step, **self.counts(), "shards": new.shards[:SHOWN],
                     "samples": new.samples[:SHOWN]})
            print(f"[train] data.on_error=skip: {len(new.shards)} shard read(s) and {len(new.samples)} sample(s) "
                  f"skipped by step {step} (run total {self.shards} and {self.samples}); first: "
                  f"{(new.shards + new.samples)[0]}", flush=True)
        return self.counts()

"""What a run skipped with `data.on_error: skip`: shard reads and samples, summed over ranks and over
restarts (the counts travel in the checkpoint metrics), logged to `metrics.jsonl` and the console. A skipped
shard read was trained on up to its error (a shard shorter than its manifest is found at its end): those
samples are counted too, so the counts say what the run saw."""
from __future__ import annotations

import torch.distributed as dist

from dml_core.data.shard_stream import ErrorLog

KEYS = ("skipped_shards", "skipped_samples", "samples_from_skipped_shards")
SHOWN = 5  # messages per kind in one log record


class SkippedData:
    """Rank-local `errors` (filled by the reader) and the run's totals, updated at every checkpoint."""

    def __init__(self, resumed_metrics: dict | None = None) -> None:
        self.errors = ErrorLog()
        metrics = resumed_metrics or {}
        self.shards, self.samples, self.kept = (int(metrics.get(k, 0)) for k in KEYS)

    def counts(self) -> dict[str, int]:
        return dict(zip(KEYS, (self.shards, self.samples, self.kept)))

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
        self.kept += new.kept
        if log is not None and (new.shards or new.samples):
            log.log({"event": "skipped", "step": step, **self.counts(), "shards": new.shards[:SHOWN],
                     "samples": new.samples[:SHOWN]})
            print(f"[train] data.on_error=skip: {len(new.shards)} shard read(s) (after {new.kept} of their samples "
                  f"were read and trained on) and {len(new.samples)} sample(s) skipped by step {step} (run totals "
                  f"{self.shards}, {self.kept} and {self.samples}); first: {(new.shards + new.samples)[0]}", flush=True)
        return self.counts()

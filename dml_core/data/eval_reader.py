"""Evaluation reader: every sample exactly once, with its id, no resampling and no shuffle, split across
ranks and DataLoader workers without overlap.

Splitting: each (rank, loader worker) pair is a part, `part = rank * num_workers + worker`, out of
`parts = world_size * num_workers`. With at least as many shards as parts ("shard" mode) part i reads the
shards `i, i + parts, ...` of the manifest order. With fewer shards ("sample" mode, chosen automatically)
every part reads all shards and keeps the samples whose position in the manifest order is i modulo
parts: more reading, but no part sits idle and no rank gets nothing. Ranks may receive different numbers
of samples (`rank_count` says how many), so callers must not run a collective per batch.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dml_core.data.manifest import Manifest
from dml_core.data.shard_stream import (Batch, ErrorLog, check_on_error, check_rank, collate, decoder,
                                        iter_samples, merge_errors, shard_counts, worker_init)

SPLIT_BY = ("auto", "shard", "sample")


def split_mode(num_shards: int, parts: int, split_by: str = "auto") -> str:
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if split_by != "auto":
        return split_by
    return "shard" if num_shards >= parts else "sample"


class EvalStream(IterableDataset):
    """The per-worker pipeline: this part's shards (or samples) -> decoded batches of `batch_size`."""

    def __init__(self, urls: Iterable[str], *, rank: int, world_size: int, batch_size: int,
                 num_workers: int, image_size: int | None = None, channels: int | None = None,
                 on_error: str = "raise", split_by: str = "auto", endpoint_url: str | None = None,
                 counts: Iterable[int] | None = None):
        self.urls, self.endpoint_url = list(urls), endpoint_url
        self.counts = shard_counts(self.urls, counts)  # each shard read is checked against its count
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_on_error(on_error)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers = max(1, num_workers)  # the loader's worker count (0 = main process = 1 part)
        self.image_size, self.channels, self.on_error = image_size, channels, on_error
        self.mode = split_mode(len(self.urls), world_size * self.num_workers, split_by)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(f"EvalStream built for {self.num_workers} loader workers runs in {num_workers}")
        part, parts = self.rank * num_workers + worker, self.world_size * num_workers
        errors = ErrorLog()
        if self.mode == "shard":
            samples = iter_samples(self.urls[part::parts], self.on_error, errors, endpoint_url=self.endpoint_url,
                                   counts=self.counts)
        else:
            samples = islice(iter_samples(self.urls, self.on_error, errors, endpoint_url=self.endpoint_url,
                                          counts=self.counts), part, None, parts)
        decode = decoder(self.image_size, self.channels, self.on_error, errors)
        group = []
        for s in samples:
            d = decode(s)
            if d is not None:
                group.append(d)
            if len(group) == self.batch_size:
                yield collate(group, errors)
                group = []
        if group:
            yield collate(group, errors)

    def part_count(self, counts: list[int], part: int) -> int:
        """Samples part `part` yields, given the manifest's per-shard counts (no errors)."""
        parts = self.world_size * self.num_workers
        if self.mode == "shard":
            return sum(counts[part::parts])
        total = sum(counts)
        return total // parts + (1 if part < total % parts else 0)


class EvalReader:
    """Iterate the reader for this rank's batches; skipped errors land in `errors`."""

    def __init__(self, urls: Iterable[str], *, rank: int, world_size: int, batch_size: int = 256,
                 num_workers: int = 2, endpoint_url: str | None = None, counts: list[int] | None = None,
                 pin_memory: bool = False, multiprocessing_context: str | None = None, **stream_kwargs):
        self.stream = EvalStream(urls, rank=rank, world_size=world_size, batch_size=batch_size,
                                 num_workers=num_workers, endpoint_url=endpoint_url, counts=counts, **stream_kwargs)
        self.num_workers, self.counts = num_workers, counts
        self.pin_memory, self.multiprocessing_context = pin_memory, multiprocessing_context
        self.errors = ErrorLog()

    @classmethod
    def from_manifest(cls, manifest: Manifest, splits: str | Iterable[str] = "eval", **kw) -> "EvalReader":
        """A reader of the shards of `splits` (one name or several), knowing their sample counts (each
        shard is checked against its count as it is read)."""
        shards = manifest.shards(splits)
        return cls([u for u, _ in shards], counts=[c for _, c in shards], **kw)

    def rank_count(self) -> int:
        """Samples this rank will read (from the manifest counts), e.g. to pad a gather."""
        if self.counts is None:
            raise ValueError("rank_count needs the per-shard counts (use EvalReader.from_manifest)")
        s = self.stream
        return sum(s.part_count(self.counts, s.rank * s.num_workers + w) for w in range(s.num_workers))

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=worker_init, pin_memory=self.pin_memory,
                            multiprocessing_context=self.multiprocessing_context if self.num_workers else None)
        return merge_errors(loader, self.errors)

"""Pieces shared by the training and evaluation readers: reading the raw samples of one shard with errors
that name it, a seeded shuffle buffer, and the `Batch` they yield.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from dml_core import storage
from dml_core.data.decode import DecodedSample, SampleDecodeError, decode_sample

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class ShardReadError(RuntimeError):
    """A shard that could not be read (missing, truncated, not a tar); the message starts with its URL.

    Constructible from the message alone, so DataLoader workers re-raise it with its own type.
    """

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url

    @classmethod
    def wrap(cls, url: str, cause: BaseException) -> "ShardReadError":
        detail = cause.args[0] if cause.args and isinstance(cause.args[0], str) else cause
        return cls(f"failed reading shard {url}: {type(cause).__name__}: {detail}", url)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def shard_counts(urls: list[str], counts: Iterable[int] | None) -> dict[str, int] | None:
    """{URL: manifest sample count} for the readers' per-shard check (None: counts unknown, no check)."""
    if counts is None:
        return None
    counts = list(counts)
    if len(counts) != len(urls):
        raise ValueError(f"{len(counts)} shard counts for {len(urls)} shards")
    return dict(zip(urls, counts))


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")


def iter_shard(url: str, endpoint_url: str | None = None, expected: int | None = None) -> Iterator[dict]:
    """Raw samples of one shard (dicts of extension -> bytes with `__key__`, `__url__`); errors name it.

    With `expected` (the manifest's count) a shard that ends with fewer samples, or holds more, raises:
    a tar cut at a member boundary parses cleanly. Samples past `expected` are counted, never yielded.
    The stream is closed when the shard ends or the generator is closed, so no open S3 file outlives it
    (and none is inherited by forked DataLoader workers)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = None
    try:
        stream = storage.open_read(url, endpoint_url)  # never a shell `pipe:` URL: fsspec has no such scheme
        files = tar_file_expander([{"url": url, "stream": stream}], handler=wds.reraise_exception)
        n = 0
        for sample in group_by_keys(files, handler=wds.reraise_exception):
            n += 1
            if expected is None or n <= expected:
                yield sample
        if expected is not None and n != expected:
            raise ShardReadError(f"failed reading shard {url}: it holds {n} samples, the manifest says "
                                 f"{expected} ({'truncated' if n < expected else 'appended to'}?)", url)
    except (ShardReadError, storage.StorageUnavailableError):
        raise  # ours; or storage away past storage.retry_seconds: not a bad shard, never skipped as one
    except Exception as exn:  # any open/read/parse error: re-raise naming the shard
        raise ShardReadError.wrap(url, exn) from exn
    finally:
        if stream is not None:
            stream.close()


@dataclass
class ErrorLog:
    """Errors skipped by `on_error="skip"`: counted and kept (URL + message), never silent. `kept`: samples of
    the skipped shard reads yielded before their error was found (a short shard is found at its end)."""

    shards: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    kept: int = 0

    def extend(self, other: "ErrorLog") -> None:
        self.shards += other.shards
        self.samples += other.samples
        self.kept += other.kept

    def take(self) -> "ErrorLog":
        out = ErrorLog(self.shards, self.samples, self.kept)
        self.shards, self.samples, self.kept = [], [], 0
        return out


def iter_samples(urls: Iterable[str], on_error: str = "raise", errors: ErrorLog | None = None,
                 max_consecutive_failures: int = 50, endpoint_url: str | None = None,
                 counts: dict[str, int] | None = None) -> Iterator[dict]:
    """Raw samples of the shards in order, each checked against its manifest count in `counts` (by URL).
    With `on_error="skip"` a bad shard is logged, counted in `errors.shards` and the stream moves on;
    samples read from it before the error are kept, and their number is in the message and `errors.kept`."""
    check_on_error(on_error)
    failures = 0
    for url in urls:
        read = 0
        try:
            for sample in iter_shard(url, endpoint_url, counts.get(url) if counts else None):
                failures, read = 0, read + 1
                yield sample
        except ShardReadError as exn:
            if on_error == "raise":
                raise
            message = f"{exn}; the {read} sample(s) read from it before were kept"
            log.warning("skipping shard: %s", message)
            if errors is not None:
                errors.shards.append(message)
                errors.kept += read
            failures += 1
            if failures >= max_consecutive_failures:
                raise RuntimeError(f"{failures} shards in a row failed; last: {exn}") from exn


def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `buffer_size` items (deterministic for a seeded `rng`)."""
    if buffer_size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass
class Batch:
    """What the readers yield. `images` is N x C x H x W (or N x D for `.npy` datasets)."""

    images: torch.Tensor
    labels: torch.Tensor  # int64
    ids: torch.Tensor  # int64, stable sample ids
    errors: ErrorLog = field(default_factory=ErrorLog)  # errors skipped since the previous batch

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking), self.labels.to(device),
                     self.ids.to(device), self.errors)

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.ids.pin_memory(), self.errors)


def collate(decoded: list[DecodedSample], errors: ErrorLog | None = None) -> Batch:
    shapes = {tuple(d.image.shape) for d in decoded}
    if len(shapes) != 1:
        raise SampleDecodeError(f"samples in one batch have different shapes {sorted(shapes)}; set image_size "
                                f"(first ids: {[d.id for d in decoded[:5]]})")
    return Batch(images=torch.stack([d.image for d in decoded]),
                 labels=torch.tensor([d.label for d in decoded], dtype=torch.int64),
                 ids=torch.tensor([d.id for d in decoded], dtype=torch.int64),
                 errors=errors.take() if errors is not None else ErrorLog())


def decoder(image_size: int | None, channels: int | None, on_error: str,
            errors: ErrorLog) -> Callable[[dict], DecodedSample | None]:
    """decode_sample with the reader's error policy: a bad sample raises, or is counted and skipped (None)."""
    def run(sample: dict) -> DecodedSample | None:
        try:
            return decode_sample(sample, image_size=image_size, channels=channels)
        except SampleDecodeError as exn:
            if on_error == "raise":
                raise
            log.warning("skipping sample: %s", exn)
            errors.samples.append(str(exn))
            return None
    return run


def worker_init(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: one compute thread per loader worker, and none of the thread at-exit hooks
    a forked worker inherits: they belong to the parent's threads, which the child does not have (Prefect 3.8's
    service hooks assert there, so a worker forked after a flow run would exit with code 1 and fail the loader)."""
    torch.set_num_threads(1)
    inherited = getattr(threading, "_threading_atexits", None)  # CPython's list behind threading._register_atexit
    if inherited is not None:
        inherited.clear()


def merge_errors(batches: Iterable[Batch], into: ErrorLog) -> Iterator[Batch]:
    """Pass batches through, collecting the errors each carries from its loader worker into `into`."""
    for batch in batches:
        into.extend(batch.errors)
        yield batch

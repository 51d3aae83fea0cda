"""Training reader: an endless, resampled, shuffled stream of shards cut into exactly `steps` batches per
rank and epoch, so every DDP rank runs the same number of steps (no hang at the last all-reduce).

Splitting: rank and world size are passed explicitly (Ray workers pass theirs). Each (rank, loader worker)
pair is one "part"; when there are at least as many shards as parts, each part resamples only from its
own shards (a fresh seeded assignment each epoch), otherwise every part resamples from all shards with its
own seed. Supervised mode yields P x K batches (see `pk_batches.py`); self-supervised mode yields plain
batches of decoded images, and the two views are made on the training device by `augment.two_views`.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dml_core.config import ConfigError
from dml_core.data.decode import SampleDecodeError, check_extensions, decode_label
from dml_core.data.manifest import Manifest, SplitInfo
from dml_core.data.pk_batches import PKBatcher
from dml_core.data.shard_stream import (Batch, ErrorLog, check_on_error, check_rank, collate, decoder,
                                        iter_samples, merge_errors, shard_counts, shuffled, worker_init)

MODES = ("supervised", "self_supervised")


def part_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    """The random stream of one (rank, worker) in one epoch; str seeds hash the same in every process."""
    return random.Random(f"dml-train/{seed}/{epoch}/{rank}/{worker}")


def worker_steps(steps: int, worker: int, num_workers: int) -> int:
    """Batches loader worker `worker` yields; the DataLoader's round robin then gives exactly `steps`."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def first_classes(info: SplitInfo, n: int | None) -> list[int]:
    """The first `n` labels of a split, ascending (all when None): what `data.train_classes` trains on."""
    if n is not None and not 1 <= n <= len(info.classes):
        raise ValueError(f"data.train_classes={n}, but the split has {len(info.classes)} classes")
    return info.labels[:n]


def _sample_key(sample: dict) -> str:
    return sample["__key__"]


def resampled(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield urls[rng.randrange(len(urls))]


class TrainStream(IterableDataset):
    """The per-worker pipeline: shards -> samples -> shuffle buffer -> batches (-> decoded `Batch`).

    `num_classes`: classes in the shards with at least two samples (the manifest knows), so a `p` that
    no batch can fill is refused when the stream is built. `classes`: keep only samples of these labels."""

    def __init__(self, urls: Iterable[str], *, rank: int, world_size: int, steps: int,
                 mode: str = "supervised", p: int | None = None, k: int | None = None,
                 batch_size: int | None = None, shuffle_buffer: int = 1000, pk_buffer: int | None = None,
                 image_size: int | None = None, channels: int | None = None, seed: int = 0,
                 on_error: str = "raise", endpoint_url: str | None = None, num_classes: int | None = None,
                 counts: Iterable[int] | None = None, classes: Iterable[int] | None = None):
        self.urls, self.endpoint_url = list(urls), endpoint_url
        if not self.urls:
            raise ValueError("no training shards")
        self.counts = shard_counts(self.urls, counts)  # each shard read is checked against its count
        check_rank(rank, world_size)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "supervised":
            if p is None or k is None:
                raise ValueError("supervised mode needs p (classes per batch) and k (items per class)")
            PKBatcher(p, k, buffer_size=pk_buffer, num_classes=num_classes)  # its checks, here, not in a worker
        if mode == "self_supervised" and (batch_size is None or batch_size < 1):
            raise ValueError("self_supervised mode needs batch_size >= 1")
        check_on_error(on_error)
        self.classes = None if classes is None else frozenset(classes)
        if self.classes is not None and not self.classes:
            raise ValueError("classes is empty: no sample would ever be kept")
        self.rank, self.world_size, self.steps, self.mode = rank, world_size, steps, mode
        self.p, self.k, self.batch_size = p, k, batch_size
        self.shuffle_buffer, self.pk_buffer = shuffle_buffer, pk_buffer
        self.image_size, self.channels, self.seed, self.on_error = image_size, channels, seed, on_error
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def part_urls(self, worker: int, num_workers: int) -> list[str]:
        """The shards this (rank, worker) resamples from in the current epoch."""
        parts = self.world_size * num_workers
        if len(self.urls) < parts:
            return self.urls
        order = list(self.urls)
        random.Random(f"dml-train-shards/{self.seed}/{self.epoch}").shuffle(order)
        return order[self.rank * num_workers + worker::parts]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = worker_steps(self.steps, worker, num_workers)
        rng = part_rng(self.seed, self.epoch, self.rank, worker)
        errors = ErrorLog()
        part = self.part_urls(worker, num_workers)
        samples = iter_samples(resampled(part, rng), self.on_error, errors, endpoint_url=self.endpoint_url,
                               counts=self.counts)
        samples = shuffled(samples, self.shuffle_buffer, rng)
        decode = decoder(self.image_size, self.channels, self.on_error, errors)
        made = 0
        for group in self._groups(samples, rng, errors, part):
            if made == n:
                return
            decoded = [decode(s) for s in group]
            if any(d is None for d in decoded):
                continue  # skip mode: the bad sample is counted; take the next whole batch
            yield collate(decoded, errors)
            made += 1

    def _groups(self, samples: Iterator[dict], rng: random.Random, errors: ErrorLog, part: list[str]
                ) -> Iterator[list]:
        if self.mode == "self_supervised":
            if self.classes is not None:  # only then is the label read before decoding
                samples = self._labelled(samples, errors, part)
            group, keys = [], set()
            for s in samples:
                if s["__key__"] in keys:  # a resampled shard read twice: keep one copy per batch
                    continue
                group.append(s)
                keys.add(s["__key__"])
                if len(group) == self.batch_size:
                    yield group
                    group, keys = [], set()
            return
        pk = PKBatcher(self.p, self.k, buffer_size=self.pk_buffer, seed=rng.randrange(2**31), key_fn=_sample_key)
        yield from pk(self._labelled(samples, errors, part))

    def _labelled(self, samples: Iterator[dict], errors: ErrorLog, part: list[str]) -> Iterator[dict]:
        """Samples whose label can be read (P x K needs it before decoding the image) and is in `classes`.
        The stream is endless, so a part whose shards hold none of `classes` is refused after ten passes' worth
        of samples (when the shard counts are known) instead of waiting forever."""
        patience = None if self.counts is None else 10 * sum(self.counts[u] for u in part)
        dropped = 0
        for s in samples:
            try:
                check_extensions(s)
                label = decode_label(s)
            except SampleDecodeError as exn:
                if self.on_error == "raise":
                    raise
                errors.samples.append(str(exn))
                continue
            if self.classes is None or label in self.classes:
                dropped = 0
                yield s
                continue
            dropped += 1
            if patience is not None and dropped > patience:
                raise ConfigError(  # a setting, not a fault: retrying the run would only fail again
                    f"rank {self.rank}: none of {dropped} samples read from its {len(part)} shard(s) ({part[0]}, ...) "
                    f"is of the {len(self.classes)} classes it trains on (data.train_classes); "
                    "use fewer ray.num_workers or data.loader_workers, or more classes")


class TrainReader:
    """Iterate `reader.epoch(e)` (or the reader itself) for `steps` batches; skipped errors land in `errors`."""

    def __init__(self, urls: Iterable[str], *, rank: int, world_size: int, steps: int, num_workers: int = 2,
                 endpoint_url: str | None = None, pin_memory: bool = False,
                 multiprocessing_context: str | None = None, **stream_kwargs):
        self.stream = TrainStream(urls, rank=rank, world_size=world_size, steps=steps, endpoint_url=endpoint_url,
                                  **stream_kwargs)
        self.num_workers = num_workers
        self.pin_memory, self.multiprocessing_context = pin_memory, multiprocessing_context
        self.errors = ErrorLog()
        self._next_epoch = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str = "train", train_classes: int | None = None,
                      **kw) -> "TrainReader":
        """A reader of `split`'s shards (of its first `train_classes` labels when set), each checked against
        its manifest count as it is read; in supervised mode a `p` the split can never fill fails here."""
        info = manifest.split(split)
        shards = manifest.shards(split)
        try:
            classes = first_classes(info, train_classes)
            return cls([u for u, _ in shards], counts=[c for _, c in shards],
                       num_classes=sum(1 for c in classes if info.classes[c] >= 2),
                       classes=None if train_classes is None else classes, **kw)
        except ValueError as e:
            raise ValueError(f"{e} (split {split!r} of {manifest.url})") from e

    def __len__(self) -> int:
        return self.stream.steps

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.stream.set_epoch(epoch)
        self._next_epoch = epoch + 1
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=worker_init, pin_memory=self.pin_memory,
                            multiprocessing_context=self.multiprocessing_context if self.num_workers else None)
        return merge_errors(loader, self.errors)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self._next_epoch)

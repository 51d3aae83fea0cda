"""Class-balanced P x K batches from a stream: every batch holds P classes with K items each, so every
anchor has positives. Items wait in a bounded per-class buffer until P classes have K items.

When the buffer is full and no P x K batch can be formed (many classes with few items each), a
"relaxed" batch of the same size P*K is made from classes holding at least `min_per_class` (>= 2) items,
each giving 2..K items; if even that is impossible one item is dropped, from the class that has been too small to use for the longest. Both are counted
in `stats`, never silent. The batch size is always exactly P*K (all ranks gather equal shapes).
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Iterator

from dml_core.data.decode import decode_label


class PKBatcher:
    """Turn a stream of items into P x K batches (lists of items grouped by class).

    With `key_fn`, an item whose key is already buffered is dropped (counted in `stats["duplicates"]`).
    With `num_classes` (classes in the stream with at least two items, e.g. from the manifest), a `p` no
    batch can ever fill is refused at once instead of stalling.
    """

    def __init__(self, p: int, k: int, buffer_size: int | None = None, seed: int = 0,
                 label_fn: Callable[[Any], int] = decode_label, min_per_class: int = 2,
                 key_fn: Callable[[Any], Hashable] | None = None, max_stall: int | None = None,
                 num_classes: int | None = None):
        if p < 1 or k < 2:
            raise ValueError(f"P x K batches need p >= 1 and k >= 2 (positives), got p={p}, k={k}")
        if num_classes is not None and p > num_classes:
            raise ValueError(f"p={p} classes per batch, but the stream has only {num_classes} classes with at "
                             "least 2 items; no P x K batch can ever be formed")
        if not 2 <= min_per_class <= k:
            raise ValueError(f"min_per_class must be in [2, k={k}], got {min_per_class}")
        self.p, self.k, self.min_per_class = p, k, min_per_class
        self.buffer_size = buffer_size if buffer_size is not None else 16 * p * k
        if self.buffer_size < p * k:
            raise ValueError(f"buffer_size {self.buffer_size} < p*k = {p * k}")
        self.rng = random.Random(seed)
        self.label_fn, self.key_fn = label_fn, key_fn
        # items dropped or refused as duplicates in a row with no batch before giving up (an endless
        # stream would otherwise hang, e.g. a small split resampled forever: every item is a duplicate)
        self.max_stall = max_stall if max_stall is not None else 50 * self.buffer_size
        self._stall = 0
        self.stats = {"batches": 0, "relaxed_batches": 0, "dropped": 0, "leftover": 0, "duplicates": 0}
        self._keys: set = set()  # keys of buffered items (with key_fn), so no batch holds an item twice
        self._by_class: dict[int, deque] = {}
        self._ready: set[int] = set()  # classes with >= k items
        self._small: dict[int, None] = {}  # classes with < min_per_class items, oldest first
        self._size = 0
        self._labels_seen: set[int] = set()

    def __call__(self, items: Iterable) -> Iterator[list]:
        for item in items:
            if not self._add(item):
                self._stalled()
            elif len(self._ready) >= self.p:
                self._stall = 0
                yield self._take_full()
            elif self._size > self.buffer_size:
                batch = self._take_relaxed()
                if batch is not None:
                    self._stall = 0
                    yield batch
                else:
                    self._drop_oldest()
                    self._stalled()
        while len(self._ready) >= self.p:
            yield self._take_full()
        while (batch := self._take_relaxed()) is not None:
            yield batch
        self.stats["leftover"] += self._size

    def _stalled(self) -> None:
        self._stall += 1
        if self._stall > self.max_stall:
            raise RuntimeError(
                f"no {self.p} x {self.k} batch could be formed from the last {self._stall} items "
                f"({len(self._labels_seen)} distinct classes seen so far, {len(self._by_class)} in a buffer of "
                f"{self.buffer_size}); the stream has too few classes or too few items per class for "
                f"p={self.p}, k={self.k}")

    def _add(self, item) -> bool:
        """Buffer `item`; False if it was refused as a duplicate."""
        if self.key_fn is not None:
            key = self.key_fn(item)
            if key in self._keys:  # e.g. a resampled shard read twice: drop the second copy
                self.stats["duplicates"] += 1
                return False
            self._keys.add(key)
        label = int(self.label_fn(item))
        self._labels_seen.add(label)
        q = self._by_class.setdefault(label, deque())
        q.append(item)
        self._size += 1
        self._update(label)
        return True

    def _update(self, label: int) -> None:
        n = len(self._by_class.get(label, ()))
        if n >= self.k:
            self._ready.add(label)
        else:
            self._ready.discard(label)
        if 0 < n < self.min_per_class:
            self._small.setdefault(label, None)
        else:
            self._small.pop(label, None)
        if n == 0:
            self._by_class.pop(label, None)

    def _pop(self, label: int, n: int) -> list:
        q = self._by_class[label]
        out = [q.popleft() for _ in range(n)]
        self._size -= n
        if self.key_fn is not None:
            self._keys.difference_update(self.key_fn(x) for x in out)
        self._update(label)
        return out

    def _take_full(self) -> list:
        labels = self.rng.sample(sorted(self._ready), self.p)
        self.stats["batches"] += 1
        return [item for c in labels for item in self._pop(c, self.k)]

    def _take_relaxed(self) -> list | None:
        """P*K items from classes with >= min_per_class items each (2..K per class), or None."""
        candidates = sorted(c for c, q in self._by_class.items() if len(q) >= self.min_per_class)
        self.rng.shuffle(candidates)
        remaining, plan = self.p * self.k, []
        for c in candidates:
            n = min(len(self._by_class[c]), self.k, remaining)
            if remaining - n and remaining - n < self.min_per_class:
                n = remaining - self.min_per_class  # leave room for one more class
            if n < self.min_per_class:
                continue
            plan.append((c, n))
            remaining -= n
            if remaining == 0:
                break
        if remaining:
            return None
        self.stats["batches"] += 1
        self.stats["relaxed_batches"] += 1
        return [item for c, n in plan for item in self._pop(c, n)]

    def _drop_oldest(self) -> None:
        """Drop one item, preferring the class that has been too small to use for the longest."""
        label = next(iter(self._small)) if self._small else next(iter(self._by_class))
        self._pop(label, 1)
        self.stats["dropped"] += 1

"""The source interface: a listing of (reference, class) items, a loader for one item, a fingerprint.

Sources are cheap to list and load items one at a time, so the shard writer can split classes before
reading any image and never holds a whole dataset in memory.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np

#: what `Source.load` returns: encoded image bytes (PNG, JPEG, ...) or an array
#: (uint8 HxW / HxWxC image, or a 1-D float embedding).
Payload = Union[bytes, np.ndarray]

#: file name suffixes an image folder lists as images (any format Pillow reads; the shard writer keeps
#: PNG and JPEG bytes and re-encodes the rest to PNG). Not the tar member names: see layout.py.
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class SourceError(ValueError):
    """The source as a whole is unusable (missing folder, empty dataset, missing column, ...)."""


class ItemError(ValueError):
    """One item cannot be loaded; the message names the item (file, row or index)."""


@dataclass(frozen=True)
class ItemRef:
    """One item of a source, before loading.

    ref: unique, stable reference (a relative path, "file#index", "U+0041@DejaVuSans.ttf").
    class_name: the item's class. split: set only when the source dictates it (manifest split column).
    error: a problem found while listing (unknown label, unsupported file); such items are never loaded.
    """

    ref: str
    class_name: str
    split: str | None = None
    error: str | None = None


class Source(ABC):
    """A raw dataset: list its items, load one, fingerprint the whole."""

    kind: str = "source"

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able description for the manifest's "source" entry (always includes "kind")."""

    @abstractmethod
    def list_items(self) -> list[ItemRef]:
        """Every item, in a deterministic order; raises SourceError if the source is unusable."""

    @abstractmethod
    def load(self, item: ItemRef) -> Payload:
        """The item's data; raises ItemError naming the item if it cannot be read."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex of everything that determines the items (listing and contents)."""

    def __iter__(self) -> Iterator[tuple[str, Payload, str]]:
        """(source_ref, data, class_name) for every loadable item; listing errors raise ItemError."""
        for item in self.list_items():
            if item.error:
                raise ItemError(f"{item.ref}: {item.error}")
            yield item.ref, self.load(item), item.class_name


def sha256_json(obj) -> str:
    """sha256 hex of a canonical JSON encoding (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(fs, path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)

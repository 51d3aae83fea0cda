"""A CSV or JSONL manifest of images: fields `path`, `label` (the class name), optional `split`.

Relative paths are resolved against the manifest's folder (local or s3://). If `classes` is given,
a label outside it is a bad item. If any row has a split, every row must: values train, eval (alias
query) or gallery; the manifest's splits then replace the seeded class split.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json

from dml_core import storage
from dml_core.data.sources.base import ItemError, ItemRef, Source, SourceError, sha256_file

SPLIT_ALIASES = {"train": "train", "eval": "eval", "query": "eval", "gallery": "gallery"}


class ManifestSource(Source):
    kind = "manifest"

    def __init__(self, path: str, classes: list[str] | None = None) -> None:
        self.path = str(path)
        self.classes = None if classes is None else [str(c) for c in classes]
        self._fs, self._fpath = storage.filesystem(self.path)
        self._base = self._fpath.rsplit("/", 1)[0] if "/" in self._fpath else "."
        self._items: list[ItemRef] | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "classes": self.classes}

    def _rows(self) -> list[dict]:
        try:
            with self._fs.open(self._fpath, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"manifest {self.path}: cannot read ({e})") from e
        if self.path.lower().endswith((".jsonl", ".ndjson")):
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SourceError(f"manifest {self.path} line {n}: invalid JSON ({e})") from e
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        if not rows:
            raise SourceError(f"manifest {self.path} has no rows")
        for n, row in enumerate(rows, start=1):
            missing = [k for k in ("path", "label") if not isinstance(row, dict) or row.get(k) in (None, "")]
            if missing:
                raise SourceError(f"manifest {self.path} row {n}: missing field(s) {missing}")
        return rows

    def list_items(self) -> list[ItemRef]:
        if self._items is None:
            self._items = self._scan()
        return self._items

    def _scan(self) -> list[ItemRef]:
        rows = self._rows()
        has_split = [bool(r.get("split")) for r in rows]
        if any(has_split) and not all(has_split):
            first = has_split.index(False) + 1
            raise SourceError(f"manifest {self.path}: row {first} has no split but other rows do; give all or none")
        allowed = None if self.classes is None else set(self.classes)
        items, seen = [], set()
        for n, row in enumerate(rows, start=1):
            ref, label = str(row["path"]), str(row["label"])
            split, error = row.get("split") or None, None
            if split is not None:
                split = SPLIT_ALIASES.get(str(split).lower())
                if split is None:
                    error = f"row {n}: unknown split {row['split']!r} (use train, eval/query or gallery)"
            if allowed is not None and label not in allowed:
                error = f"row {n}: unknown label {label!r} (not in the allowed class list)"
            if ref in seen:
                error = f"row {n}: duplicate path"
            seen.add(ref)
            items.append(ItemRef(ref, label, split=split, error=error))
        return items

    def _resolve(self, ref: str) -> str:
        if "://" in ref:
            raise ItemError(f"{ref}: absolute URLs are not supported in a manifest; use paths")
        return ref if ref.startswith("/") else f"{self._base}/{ref}"

    def load(self, item: ItemRef) -> bytes:
        try:
            with self._fs.open(self._resolve(item.ref), "rb") as f:
                return f.read()
        except OSError as e:
            raise ItemError(f"{item.ref} (from manifest {self.path}): cannot read ({e})") from e

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"manifest\0")
        h.update(sha256_file(self._fs, self._fpath).encode())
        for item in self.list_items():
            try:
                content = "" if item.error else sha256_file(self._fs, self._resolve(item.ref))
            except (OSError, ItemError) as e:  # reported by load() when the item is sharded
                content = f"unreadable: {e}"
            h.update(f"{item.ref}\0{content}\n".encode())
        h.update(repr(self.classes).encode())
        return h.hexdigest()

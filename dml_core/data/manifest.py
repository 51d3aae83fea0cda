"""The dataset manifest: the contract between sharding and every reader (training, evaluation, backfill).

Read and validated once into a typed `Manifest` (errors name the file and the field); nothing else
indexes the JSON. Written by the sharding as `<root>/datasets/<name>/<version>/manifest.json`, last.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Iterable

from dml_core import storage
from dml_core.data.layout import MANIFEST_FILE, dataset_url


class ManifestError(ValueError):
    """A manifest that is malformed or does not match its shards; the message names the file and field."""


class ManifestMissing(ManifestError):
    """No manifest where one was looked for: no such dataset or version (or its sharding never finished)."""


class UnknownSplit(ManifestError, KeyError):
    """A split the manifest does not have (a KeyError too, like the dict lookup it replaces)."""

    __str__ = ValueError.__str__  # the plain message, not KeyError's repr of it


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name in the dataset folder, samples, size in bytes and sha256 (hex)."""

    name: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split: its sample count, samples per label, shards in reading order, and the range of its
    sample ids (`[lo, hi)`, recorded by the sharding; None in manifests written before it was)."""

    count: int
    classes: dict[int, int]  # label -> samples
    shards: list[ShardInfo]
    id_range: tuple[int, int] | None = None

    @property
    def labels(self) -> list[int]:
        """The labels present in the split, ascending."""
        return sorted(self.classes)

    def classes_with_at_least(self, k: int) -> int:
        """How many labels have at least `k` samples (k=2: the classes a P x K batch can use)."""
        return sum(1 for n in self.classes.values() if n >= k)

    @property
    def num_labels(self) -> int:
        """1 + the largest label (0 when empty): the rows of a per-label table such as BCT prototypes."""
        return max(self.classes, default=-1) + 1

    @property
    def missing_labels(self) -> list[int]:
        """Labels below the largest one that have no sample (empty when labels are contiguous from 0)."""
        return sorted(set(range(self.num_labels)) - set(self.classes))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"count": self.count, "classes": {str(c): n for c, n in sorted(self.classes.items())}}
        if self.id_range is not None:
            out["id_range"] = list(self.id_range)
        out["shards"] = [asdict(s) for s in self.shards]
        return out


@dataclass(frozen=True)
class SkippedItem:
    """A source item left out of the dataset (sharding with on_error="skip"), and why."""

    source: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One dataset version. `url` is its folder `<root>/datasets/<name>/<version>` (not serialised).

    Constructing one checks it for consistency (counts, shard names, labels); `read` also checks types."""

    name: str
    version: str
    fingerprint: str  # sha256 of the source fingerprint and the sharding parameters; version = its prefix
    num_classes: int
    class_names: list[str]  # label -> class name
    splits: dict[str, SplitInfo]  # exactly SPLITS, in that order
    skipped: list[SkippedItem]
    created: str  # ISO time; the newest version is the one created last
    source: dict[str, Any]  # the source's description (always has "kind")
    seed: int
    params: dict[str, Any] | None = None  # sharding parameters (None: written by another tool)
    num_train_classes: int | None = None
    source_fingerprint: str | None = None
    url: str = field(compare=False)

    def __post_init__(self) -> None:
        from dml_core.data.manifest_checks import check_consistent

        check_consistent(self)

    # ---- reading and writing

    @classmethod
    def read(cls, root: str, name: str, version: str | None = None) -> Manifest:
        """The manifest of `version` of dataset `name` under `root`, or of its newest version when None."""
        if version is None:
            versions = list_versions(root, name)
            if not versions:
                raise ManifestMissing(f"no dataset {name!r} under {root} (no {dataset_url(root, name, '*')}/"
                                      f"{MANIFEST_FILE})")
            version = versions[-1]
        url = dataset_url(root, name, version)
        where = storage.join(url, MANIFEST_FILE)
        try:
            d = json.loads(storage.read_bytes(where))
        except FileNotFoundError:
            raise ManifestMissing(f"{where} not found") from None
        except (OSError, ValueError) as e:
            raise ManifestError(f"{where}: unreadable ({e})") from e
        m = cls.from_dict(d, url)
        if (m.name, m.version) != (name, version):
            raise ManifestError(f"{where}: describes dataset {m.name!r} version {m.version!r}, "
                                f"but lies in the folder of {name!r} version {version!r}")
        return m

    @classmethod
    def from_dict(cls, d: Any, url: str) -> Manifest:
        """Parse the JSON form (checking every field's type); `url` is the dataset folder."""
        from dml_core.data.manifest_checks import parse

        return parse(d, url)

    def to_dict(self) -> dict:
        """The JSON form written to manifest.json (None-valued optional fields left out)."""
        out = {"name": self.name, "version": self.version, "fingerprint": self.fingerprint,
               "source_fingerprint": self.source_fingerprint, "source": self.source, "seed": self.seed,
               "params": self.params, "num_classes": self.num_classes, "num_train_classes": self.num_train_classes,
               "class_names": list(self.class_names), "splits": {s: i.to_dict() for s, i in self.splits.items()},
               "skipped": {"count": len(self.skipped), "items": [asdict(s) for s in self.skipped]},
               "created": self.created}
        return {k: v for k, v in out.items() if v is not None}

    def write(self) -> None:
        """Write manifest.json into the dataset folder atomically (the sharding does this last)."""
        data = json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")
        storage.write_bytes_atomic(self.manifest_url, data)

    def verify(self, level: str = "size") -> Manifest:
        """Check every shard against the manifest ("size", "sha256" or "full": see shard_check.py); raise
        ManifestError naming the first bad shard, else return self."""
        from dml_core.data.shard_check import verify_shards

        verify_shards(self, level)
        return self

    # ---- what readers and training need

    @property
    def manifest_url(self) -> str:
        return storage.join(self.url, MANIFEST_FILE)

    def split(self, name: str) -> SplitInfo:
        """The split `name`; UnknownSplit (a ManifestError and a KeyError) names it and the manifest."""
        try:
            return self.splits[name]
        except KeyError:
            raise UnknownSplit(f"split {name!r} not in manifest {self.manifest_url} "
                               f"(has {list(self.splits)})") from None

    def shards(self, splits: str | Iterable[str]) -> list[tuple[str, int]]:
        """(URL, sample count) of every shard of `splits` (one name or several), in manifest order."""
        names = [splits] if isinstance(splits, str) else list(splits)
        return [(storage.join(self.url, s.name), s.count) for n in names for s in self.split(n).shards]

    def shard_urls(self, splits: str | Iterable[str]) -> list[str]:
        """URLs of the shards of `splits`, in manifest order."""
        return [url for url, _ in self.shards(splits)]

    @property
    def count(self) -> int:
        """Samples in all splits."""
        return sum(s.count for s in self.splits.values())

    @property
    def num_train_labels(self) -> int:
        """1 + the largest training label: the rows of the BCT prototype matrix."""
        return self.splits["train"].num_labels

    @cached_property
    def num_ids(self) -> int:
        """1 + the largest sample id in any split: the size of per-sample state (the decomposable loss's).

        From the recorded id ranges; for older manifests without them, the sample count when the sharding
        wrote it with nothing skipped (ids 0..N-1), else a scan of the shards' member names."""
        ends = [s.id_range[1] for s in self.splits.values() if s.id_range is not None]
        unknown = [name for name, s in self.splits.items() if s.id_range is None]
        if not unknown:
            return max(ends, default=0)
        if self.params is not None and not self.skipped:
            return self.count
        from dml_core.data.shard_check import scan_max_id

        return max([*ends, scan_max_id(self.shard_urls(unknown)) + 1])


def list_versions(root: str, name: str) -> list[str]:
    """Versions of a dataset that have a manifest, oldest first (by their `created` time)."""
    fs, pattern = storage.filesystem(storage.join(dataset_url(root, name, "*"), MANIFEST_FILE))
    fs.invalidate_cache()
    found = []
    for m_path in fs.glob(pattern):
        try:
            with fs.open(m_path, "rb") as f:
                found.append((json.load(f).get("created", ""), m_path.rsplit("/", 2)[-2]))
        except (OSError, ValueError, AttributeError):
            continue
    return [v for _, v in sorted(found)]

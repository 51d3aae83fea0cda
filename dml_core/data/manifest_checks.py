"""Checking a manifest: the types of its JSON form (`parse`) and the agreement of its parts
(`check_consistent`, run whenever a `Manifest` is built). Every error names the file and the field."""
from __future__ import annotations

from typing import Any

from dml_core import storage
from dml_core.data.layout import MANIFEST_FILE, SHARD_NAME, SPLITS
from dml_core.data.manifest import Manifest, ManifestError, ShardInfo, SkippedItem, SplitInfo

_KINDS = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get(d: dict, key: str, kind: type, where: str, path: str = "", optional: bool = False) -> Any:
    """d[key] if it is a `kind` (None for a missing optional field); else ManifestError naming the field."""
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and not _is_int(value)):
        raise ManifestError(f"{where}: field {path + key!r} missing or not {_KINDS[kind]}")
    return value


def _objects(d: dict, key: str, where: str, path: str = "") -> list[tuple[str, dict]]:
    """The list of objects d[key], each with its field path (`path.key[i].`)."""
    out = []
    for i, x in enumerate(_get(d, key, list, where, path)):
        if not isinstance(x, dict):
            raise ManifestError(f"{where}: field '{path}{key}[{i}]' is not {_KINDS[dict]}")
        out.append((f"{path}{key}[{i}].", x))
    return out


def _parse_split(d: Any, where: str, path: str) -> SplitInfo:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: field {path!r} missing or not {_KINDS[dict]}")
    classes = _get(d, "classes", dict, where, path + ".")
    for label, n in classes.items():
        if not (label.lstrip("-").isdigit() and _is_int(n)):
            raise ManifestError(f"{where}: field '{path}.classes' has a key {label!r} that is not an integer "
                                f"label or a count {n!r} that is not an integer")
    shards = [ShardInfo(_get(s, "name", str, where, p), _get(s, "count", int, where, p),
                        _get(s, "bytes", int, where, p), _get(s, "sha256", str, where, p))
              for p, s in _objects(d, "shards", where, path + ".")]
    id_range = _get(d, "id_range", list, where, path + ".", optional=True)
    if id_range is not None:
        if len(id_range) != 2 or not all(_is_int(x) for x in id_range):
            raise ManifestError(f"{where}: field '{path}.id_range' is not a pair of integers [lo, hi)")
        id_range = (id_range[0], id_range[1])
    elif (max_id := _get(d, "max_id", int, where, path + ".", optional=True)) is not None:
        id_range = (0, max_id + 1)  # an older form: the largest id only
    return SplitInfo(_get(d, "count", int, where, path + "."), {int(k): n for k, n in classes.items()}, shards,
                     id_range)


def parse(d: Any, url: str) -> Manifest:
    """A `Manifest` from its JSON form, every field's type checked; `url` is the dataset folder."""
    where = storage.join(url, MANIFEST_FILE)
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: not a JSON object")
    splits_d = _get(d, "splits", dict, where)
    unknown = sorted(set(splits_d) - set(SPLITS))
    if unknown:
        raise ManifestError(f"{where}: field 'splits' has unknown splits {unknown} (expected {list(SPLITS)})")
    skipped = _get(d, "skipped", dict, where)
    items = [SkippedItem(_get(s, "source", str, where, p), _get(s, "reason", str, where, p))
             for p, s in _objects(skipped, "items", where, "skipped.")]
    if _get(skipped, "count", int, where, "skipped.") != len(items):
        raise ManifestError(f"{where}: field 'skipped.count' is not the number of skipped items ({len(items)})")
    names = _get(d, "class_names", list, where)
    if not all(isinstance(n, str) for n in names):
        raise ManifestError(f"{where}: field 'class_names' holds a value that is not a string")
    return Manifest(
        name=_get(d, "name", str, where), version=_get(d, "version", str, where),
        fingerprint=_get(d, "fingerprint", str, where), num_classes=_get(d, "num_classes", int, where),
        class_names=names, splits={s: _parse_split(splits_d.get(s), where, f"splits.{s}") for s in SPLITS},
        skipped=items, created=_get(d, "created", str, where), source=_get(d, "source", dict, where),
        seed=_get(d, "seed", int, where), params=_get(d, "params", dict, where, optional=True),
        num_train_classes=_get(d, "num_train_classes", int, where, optional=True),
        source_fingerprint=_get(d, "source_fingerprint", str, where, optional=True), url=url)


def check_consistent(m: Manifest) -> None:
    """Counts, labels, shard names and id ranges agree with each other; raise ManifestError naming the field."""
    where = m.manifest_url
    if len(m.class_names) != m.num_classes:
        raise ManifestError(f"{where}: num_classes {m.num_classes} != len(class_names) {len(m.class_names)}")
    if m.num_train_classes is not None and not 0 <= m.num_train_classes <= m.num_classes:
        raise ManifestError(f"{where}: num_train_classes {m.num_train_classes} not in [0, {m.num_classes}]")
    if tuple(m.splits) != SPLITS:
        raise ManifestError(f"{where}: splits are {list(m.splits)}, expected {list(SPLITS)}")
    for split, s in m.splits.items():
        shard_sum, class_sum = sum(x.count for x in s.shards), sum(s.classes.values())
        if not s.count == shard_sum == class_sum:
            raise ManifestError(f"{where}: splits.{split} counts disagree (count {s.count}, shards sum to "
                                f"{shard_sum}, classes sum to {class_sum})")
        bad = [c for c, n in s.classes.items() if not 0 <= c < m.num_classes or n < 1]
        if bad:
            raise ManifestError(f"{where}: splits.{split}.classes has labels outside [0, {m.num_classes}) "
                                f"or without samples: {bad[:5]}")
        for i, shard in enumerate(s.shards):
            if not SHARD_NAME.match(shard.name) or not shard.name.startswith(split + "-"):
                raise ManifestError(f"{where}: splits.{split}.shards[{i}] has a bad shard name {shard.name!r}")
            if shard.count < 0 or shard.bytes < 0:
                raise ManifestError(f"{where}: splits.{split}.shards[{i}] has a negative count or size")
        if s.id_range is not None and not 0 <= s.id_range[0] <= s.id_range[1] - s.count:
            raise ManifestError(f"{where}: splits.{split}.id_range {list(s.id_range)} cannot hold "
                                f"{s.count} distinct ids")

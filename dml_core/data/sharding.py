"""Turn a source into a versioned WebDataset dataset (the layout in DESIGN.md), idempotently.

`shard_dataset` lists the source, splits classes open-world, writes each split's shards (each one
atomically), and writes manifest.json last. The version is the first 12 hex digits of the dataset
fingerprint (source fingerprint + split/shard parameters): an unchanged source and parameters find
the existing valid dataset and write nothing; anything else makes a new version directory. A run killed
half-way leaves no manifest, so the next run cleans the leftovers and writes the dataset again.
Two writers of the same dataset version at the same time are not supported (run one shard job).
"""
from __future__ import annotations

import datetime
import logging
import re
from typing import Callable

from dml_core import storage
from dml_core.data.layout import MANIFEST_FILE, SHARD_NAME, SPLITS, dataset_url
from dml_core.data.manifest import Manifest, ManifestError, ManifestMissing, SkippedItem, SplitInfo
from dml_core.data.shard_check import check_level
from dml_core.data.shard_writer import ShardWriter, encode_payload, sample_members
from dml_core.data.sources.base import ItemError, ItemRef, Source, SourceError, sha256_json
from dml_core.data.splits import assign_splits, label_map, shard_order, split_classes

log = logging.getLogger(__name__)
TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{32}$")

Progress = Callable[[str, int, int], None]  # (split, samples done in this split, split total)


class ShardingError(ValueError):
    """A bad item in raise mode, or a source that cannot be sharded; the message names the item."""


def shard_dataset(source: Source, root: str, name: str, *, seed: int = 0, eval_class_fraction: float = 0.5,
                  gallery_fraction: float = 0.5, on_error: str = "raise", max_shard_bytes: int = 64 << 20,
                  max_shard_samples: int = 10_000, verify: str = "size", progress: Progress | None = None,
                  log_every: int = 5000) -> Manifest:
    """Shard `source` under `<root>/datasets/<name>/<version>/` and return its manifest.

    on_error: "raise" stops at the first bad item naming it; "skip" leaves bad items out and lists them
    in the manifest's `skipped`. verify: how an existing dataset is checked before it is reused, "size"
    (shards exist with the recorded sizes), "sha256" (also re-hash every shard) or "full" (also parse them).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_level(verify)
    params = sharding_params(seed, eval_class_fraction, gallery_fraction, max_shard_bytes, max_shard_samples)
    source_fp = source.fingerprint()
    fingerprint = dataset_fingerprint(source_fp, params)
    version = fingerprint[:12]
    out = dataset_url(root, name, version)
    existing = _existing(root, name, version, fingerprint, verify)
    if existing is not None:
        log.info("dataset %s version %s is up to date at %s; nothing to do", name, version, out)
        return existing

    _remove_leftovers(out, keep=(), stale_manifest=True)
    items = source.list_items()
    skipped: list[SkippedItem] = []
    plan = _plan(items, skipped, on_error, seed, eval_class_fraction, gallery_fraction)
    splits = {}
    for split in SPLITS:
        splits[split] = _write_split(source, out, split, plan, skipped, on_error, max_shard_bytes,
                                     max_shard_samples, progress, log_every)
    _remove_leftovers(out, keep={s.name for sp in splits.values() for s in sp.shards})
    manifest = Manifest(name=name, version=version, fingerprint=fingerprint, source_fingerprint=source_fp,
                        source=source.describe(), seed=seed, params=params, num_classes=len(plan["class_names"]),
                        num_train_classes=plan["num_train_classes"], class_names=plan["class_names"],
                        splits=splits, skipped=skipped, url=out,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat())
    manifest.write()
    log.info("dataset %s version %s written to %s: %s samples, %d skipped", name, version, out,
             {s: splits[s].count for s in SPLITS}, len(skipped))
    return manifest


def sharding_params(seed: int = 0, eval_class_fraction: float = 0.5, gallery_fraction: float = 0.5,
                    max_shard_bytes: int = 64 << 20, max_shard_samples: int = 10_000) -> dict:
    """The sharding parameters that, with the source's fingerprint, make the dataset fingerprint."""
    return {"seed": seed, "eval_class_fraction": eval_class_fraction, "gallery_fraction": gallery_fraction,
            "max_shard_bytes": max_shard_bytes, "max_shard_samples": max_shard_samples}


def dataset_fingerprint(source_fingerprint: str, params: dict) -> str:
    """sha256 of a source and the sharding parameters; its first 12 hex digits are the dataset version."""
    return sha256_json({"source": source_fingerprint, **params})


def _existing(root: str, name: str, version: str, fingerprint: str, verify: str) -> Manifest | None:
    """The existing manifest if it matches `fingerprint` and its shards check out, else None."""
    try:
        m = Manifest.read(root, name, version)
    except ManifestMissing:
        return None
    except ManifestError as e:
        log.warning("existing manifest unusable, rewriting the dataset: %s", e)
        return None
    if m.fingerprint != fingerprint:
        log.warning("manifest for %s/%s has another fingerprint; rewriting the dataset", name, version)
        return None
    try:
        return m.verify(verify)
    except ManifestError as e:
        log.warning("%s; rewriting the dataset", e)
        return None


def _remove_leftovers(dir_url: str, keep, stale_manifest: bool = False) -> None:
    """Delete temporary files and shards not in `keep` (left by a killed run or a damaged dataset);
    with stale_manifest, the manifest first, so no reader trusts it while the shards are rewritten."""
    fs, path = storage.filesystem(dir_url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return
    if stale_manifest and fs.exists(f"{path}/{MANIFEST_FILE}"):
        log.info("removing stale manifest %s/%s", path, MANIFEST_FILE)
        fs.rm(f"{path}/{MANIFEST_FILE}")
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if TMP_NAME.search(base) or (SHARD_NAME.match(base) and base not in keep):
            log.info("removing leftover %s", p)
            fs.rm(p)


def _reject(item: ItemRef, reason: str, skipped: list, on_error: str) -> None:
    if on_error == "raise":
        raise ShardingError(f"bad item {item.ref}: {reason} (use on_error='skip' to skip and record bad items)")
    log.warning("skipping %s: %s", item.ref, reason)
    skipped.append(SkippedItem(item.ref, reason))


def _plan(items: list[ItemRef], skipped: list, on_error: str, seed: int, eval_class_fraction: float,
          gallery_fraction: float) -> dict:
    """Ids, labels and splits for every good item."""
    refs = [i.ref for i in items]
    if len(set(refs)) != len(refs):
        raise SourceError("source lists duplicate item references")
    good = []
    for item in sorted(items, key=lambda i: i.ref):
        if item.error:
            _reject(item, item.error, skipped, on_error)
        else:
            good.append(item)
    if not good:
        raise ShardingError("no usable items in the source")
    ids = {item.ref: n for n, item in enumerate(good)}
    class_of = {ids[i.ref]: i.class_name for i in good}
    if any(i.split for i in good):
        split_of = {ids[i.ref]: i.split for i in good}
        train_c = sorted({class_of[i] for i, s in split_of.items() if s == "train"})
        eval_c = sorted({class_of[i] for i, s in split_of.items() if s != "train"})
        both = set(train_c) & set(eval_c)
        if both:
            raise ShardingError(f"classes {sorted(both)[:5]} appear in train and in eval/gallery; "
                                "splits must be open-world (disjoint classes)")
    else:
        train_c, eval_c = split_classes(list(class_of.values()), eval_class_fraction, seed)
        split_of = assign_splits(class_of, eval_c, gallery_fraction, seed)
    labels = label_map(train_c, eval_c)
    return {"items": {ids[i.ref]: i for i in good}, "split_of": split_of, "labels": labels,
            "class_names": train_c + eval_c, "num_train_classes": len(train_c), "seed": seed}


def _write_split(source: Source, out: str, split: str, plan: dict, skipped: list, on_error: str,
                 max_bytes: int, max_samples: int, progress: Progress | None, log_every: int) -> SplitInfo:
    ids = shard_order([i for i, s in plan["split_of"].items() if s == split], plan["seed"], split)
    writer = ShardWriter(out, split, max_bytes, max_samples)
    classes: dict[int, int] = {}
    lo, hi = None, 0  # the range of the ids written (items that fail to load leave gaps)
    try:
        for done, sample_id in enumerate(ids, start=1):
            item = plan["items"][sample_id]
            try:
                ext, payload = encode_payload(source.load(item), item.ref)
            except ItemError as e:
                _reject(item, str(e), skipped, on_error)
                continue
            label = plan["labels"][item.class_name]
            writer.add(sample_members(sample_id, label, item.class_name, split, item.ref, ext, payload))
            classes[label] = classes.get(label, 0) + 1
            lo, hi = (sample_id if lo is None else min(lo, sample_id)), max(hi, sample_id + 1)
            if progress:
                progress(split, done, len(ids))
            if log_every and done % log_every == 0:
                log.info("%s: %d / %d samples", split, done, len(ids))
        shards = writer.close()
    except BaseException as e:
        _abort_keeping_cause(writer, e)
        raise
    return SplitInfo(count=sum(classes.values()), classes=dict(sorted(classes.items())), shards=shards,
                     id_range=(lo, hi) if lo is not None else (0, 0))


def _abort_keeping_cause(writer: ShardWriter, cause: BaseException) -> None:
    """Drop the unfinished shard; if that fails too (storage gone), say so in a note on `cause`, which
    stays the error raised: the cleanup's failure would otherwise be the last error shown."""
    try:
        writer.abort()
    except Exception as cleanup:
        cause.add_note(f"(removing the unfinished shard failed as well: {type(cleanup).__name__}: {cleanup})")

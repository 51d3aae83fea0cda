"""Ordered partial backfill (FastFill, METHODS 6.1): re-embed a share of a transformed gallery with the new
(query) model in descending uncertainty of h (or a seeded random order), a step at a time, each step ending
with an index swap.

In the transformed gallery's folder, `reembed/` holds
- `order.npz`: the gallery's ids in re-embedding order (`ids`, with the `order` and `seed` that made it),
  written once; every rerun reuses it, so a killed run resumes in the same order;
- `step-<k>.npz` (`ids`, `z`): step k (1-based) re-embeds `order[start:end]`; then its completion record
  `step-<k>.done.json` (start, end, count, bytes, sha256), as `embeddings.py` records a shard.
After step k the index of the gallery with steps 1..k in place (`gallery_state`) is saved in the gallery
folder as `index-step-<k>`, and only then is the registry switched to it (`Registry.reembedded_step`, fraction
end / N): the registry only ever points at a complete, checked index. A rerun embeds no step with a valid
record, rebuilds no index that loads and checks, and moves the registry only forward.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from dml_core import storage
from dml_core.gallery.embeddings import DTYPES, MANIFEST_FILE, GalleryError, load_arrays, read_manifest, read_shard
from dml_core.gallery.registry import Registry, RegistryError
from dml_core.training.embed import Embeddings, embed_batches

if TYPE_CHECKING:
    from dml_core.gallery.embeddings import ShardTask
    from dml_core.gallery.index import IndexSpec

REEMBED = "reembed"
ORDER_FILE = "order.npz"
ORDERS = ("uncertainty", "random")
INDEX_PREFIX = "index-step-"

Embed = Callable[["Step", np.ndarray], np.ndarray]  # (step, ids) -> the new model's z, one row per id


@dataclass(frozen=True)
class Step:
    """Step `number` (1-based) re-embeds the items at positions [start, end) of the order."""

    number: int
    start: int
    end: int

    @property
    def file(self) -> str:
        return f"step-{self.number:06d}.npz"

    @property
    def record(self) -> str:
        return f"step-{self.number:06d}.done.json"

    @property
    def index_name(self) -> str:
        return f"{INDEX_PREFIX}{self.number:06d}"


def reembed_dir(gallery_dir: str) -> str:
    return storage.join(gallery_dir, REEMBED)


def plan_steps(num_items: int, budget: float, step_fraction: float) -> list[tuple[int, int]]:
    """(start, end) positions of the steps: step k ends at round(k * step_fraction * N) (at least one item
    per step), the last at round(budget * N)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"backfill budget must be in [0, 1], got {budget!r}")
    if not 0.0 < step_fraction <= 1.0:
        raise ValueError(f"backfill step_fraction must be in (0, 1], got {step_fraction!r}")
    total, steps, start, k = round(budget * num_items), [], 0, 1
    while start < total:
        end = min(total, max(start + 1, round(k * step_fraction * num_items)))
        steps.append((start, end))
        start, k = end, k + 1
    return steps


def reembed_order(ids: np.ndarray, order: str, seed: int, log_var: np.ndarray | None = None) -> np.ndarray:
    """The ids in re-embedding order: "uncertainty" = `log_var` descending (ties by id ascending), "random" =
    a permutation seeded by `seed`."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise GalleryError("the gallery holds duplicate ids: no re-embedding order can be made")
    if order == "random":
        return np.random.default_rng(seed).permutation(np.sort(ids))
    if order != "uncertainty":
        raise ValueError(f"backfill order must be one of {ORDERS}, got {order!r}")
    if log_var is None:
        raise GalleryError("the gallery stores no log_var (its h has no uncertainty): use backfill.order random")
    log_var = np.asarray(log_var, dtype=np.float64)
    if log_var.shape != ids.shape or not np.isfinite(log_var).all():
        raise GalleryError(f"log_var must be finite with one value per item, got shape {log_var.shape} for "
                           f"{len(ids)} items")
    return ids[np.lexsort((ids, -log_var))]


def load_order(gallery_dir: str, order: str, seed: int) -> np.ndarray:
    """`reembed/order.npz` of the gallery, written on first use; GalleryError if it was made another way."""
    url = storage.join(reembed_dir(gallery_dir), ORDER_FILE)
    if storage.exists(url):
        saved = read_shard(url)
        made = (str(saved["order"]), int(saved["seed"]))
        if made[0] != order or (order == "random" and made[1] != seed):
            raise GalleryError(f"{url} was made in {made[0]} order (seed {made[1]}), this run asks for {order} "
                               f"(seed {seed}): finish with the same order, or transform the gallery again")
        return saved["ids"]
    arrays = load_arrays(gallery_dir, "ids", "log_var")
    ids = reembed_order(arrays["ids"], order, seed, arrays.get("log_var"))
    buf = io.BytesIO()
    np.savez(buf, ids=ids, order=np.array(order), seed=np.array(seed, dtype=np.int64))
    storage.write_bytes_atomic(url, buf.getvalue())
    return ids


def read_step_record(gallery_dir: str, number: int) -> dict | None:
    """Step `number`'s completion record if its file is there with the recorded size, else None."""
    step = Step(number, 0, 0)
    names = storage.list_names(reembed_dir(gallery_dir))
    if step.record not in names or step.file not in names:
        return None
    record = json.loads(storage.read_bytes(storage.join(reembed_dir(gallery_dir), step.record)))
    fs, path = storage.filesystem(storage.join(reembed_dir(gallery_dir), step.file))
    return record if fs.info(path)["size"] == record.get("bytes") else None


def write_step(gallery_dir: str, step: Step, ids: np.ndarray, z: np.ndarray, dtype: str = "float32",
               attempt: str = "") -> dict:
    """Write step `step`'s re-embedded vectors, then its completion record; returns the record."""
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids, dtype=np.int64), z=np.asarray(z).astype(dtype))
    data = buf.getvalue()
    out = reembed_dir(gallery_dir)
    storage.write_bytes_atomic(storage.join(out, step.file), data)
    record = {"step": step.number, "start": step.start, "end": step.end, "file": step.file, "count": len(ids),
              "dim": int(z.shape[1]), "dtype": dtype, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "attempt": attempt}
    storage.write_bytes_atomic(storage.join(out, step.record), json.dumps(record).encode())
    return record


class _State:
    """The transformed gallery in memory, with re-embedded steps put in place by id."""

    def __init__(self, gallery_dir: str) -> None:
        arrays = load_arrays(gallery_dir, "z", "ids", "labels")
        self.dir, self.ids, self.labels = gallery_dir, arrays["ids"], arrays["labels"]
        self.z = arrays["z"].astype(np.float32)
        self.sorter = np.argsort(self.ids, kind="stable")
        self.order: np.ndarray | None = None
        self.applied, self.applied_end = 0, 0  # steps 1..applied are in place, positions [0, applied_end)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` in the gallery (GalleryError naming one that is not in it)."""
        found = np.searchsorted(self.ids, ids, sorter=self.sorter)
        rows = self.sorter[np.clip(found, 0, len(self.ids) - 1)]
        missing = ids[self.ids[rows] != ids] if len(self.ids) else ids
        if len(missing):
            raise GalleryError(f"{len(missing)} re-embedded ids are not in the gallery {self.dir}: {missing[:5]}")
        return rows

    def apply(self, record: dict) -> None:
        """Put the next step's vectors in place, checked: its sha256, the order's ids, no id twice."""
        if self.order is None:
            self.order = read_shard(storage.join(reembed_dir(self.dir), ORDER_FILE))["ids"]
        number, start = self.applied + 1, self.applied_end
        if (record["step"], record["start"]) != (number, start):
            raise GalleryError(f"step record {record['file']} of {self.dir} is step {record['step']} from position "
                               f"{record['start']}, expected step {number} from {start} (step_fraction changed?)")
        arrays = read_shard(storage.join(reembed_dir(self.dir), record["file"]), record["sha256"])
        ids, z = arrays["ids"], arrays["z"]
        if not np.array_equal(ids, self.order[record["start"]:record["end"]]):
            raise GalleryError(f"{record['file']} of {self.dir} does not hold the ids at positions "
                               f"{record['start']}:{record['end']} of the order")
        if len(np.unique(ids)) != len(ids) or z.shape != (len(ids), self.z.shape[1]):
            raise GalleryError(f"{record['file']} of {self.dir}: duplicate ids or z of shape {z.shape}, expected "
                               f"({len(ids)}, {self.z.shape[1]})")
        self.z[self.positions(ids)] = z.astype(np.float32)
        self.applied, self.applied_end = number, record["end"]

    def embeddings(self) -> Embeddings:
        return Embeddings(torch.from_numpy(self.z.copy()), torch.from_numpy(self.labels), torch.from_numpy(self.ids))


def gallery_state(gallery_dir: str, steps: int) -> Embeddings:
    """The transformed gallery (every item, in its order) with the vectors of steps 1..`steps` in place of the
    transformed ones; GalleryError if a step is missing, corrupt or not the order's."""
    state = _State(gallery_dir)
    for number in range(1, steps + 1):
        record = read_step_record(gallery_dir, number)
        if record is None:
            raise GalleryError(f"step {number} of the partial backfill of {gallery_dir} is not complete")
        state.apply(record)
    return state.embeddings()


def partial_backfill(gallery_dir: str, embed: Embed, registry: Registry, name: str, *, budget: float,
                     step_fraction: float, order: str = "uncertainty", seed: int = 0,
                     index_spec: "IndexSpec | None" = None, dtype: str = "float32",
                     on_step: Callable[[int, float], None] | None = None, attempt: str = "") -> dict:
    """Re-embed round(budget * N) items of the transformed gallery at `gallery_dir` (registered as `name`)
    with `embed`, step by step in `order`, each step indexed and then registered; resumes what a killed run
    left. `on_step(k, fraction)` sees each step registered by this call. Returns a summary."""
    from dml_core.gallery.index import IndexSpec, build_index

    if dtype not in DTYPES:
        raise ValueError(f"gallery dtype must be one of {DTYPES}, got {dtype!r}")
    meta = read_manifest(gallery_dir)
    if "transformed_from" not in meta:
        raise GalleryError(f"{gallery_dir} is not a transformed gallery: nothing to backfill partially")
    embeddings = storage.join(gallery_dir, MANIFEST_FILE)
    total = meta["count"]
    steps = [Step(k, s, e) for k, (s, e) in enumerate(plan_steps(total, budget, step_fraction), start=1)]
    registered = _registered_step(registry, name, gallery_dir, embeddings)
    ids_order = load_order(gallery_dir, order, seed) if steps else None
    state, changed = _State(gallery_dir), False
    done = {"embedded": [], "indexed": [], "registered": []}
    for step in steps:
        record = read_step_record(gallery_dir, step.number)
        if record is None:
            ids = ids_order[step.start:step.end]
            record = write_step(gallery_dir, step, ids, _embedded(embed, step, ids, meta["dim"]), dtype, attempt)
            done["embedded"].append(step.number)
            changed = True
        state.apply(record)
        index = storage.join(gallery_dir, step.index_name + ".json")
        # an index the registry may serve is never rewritten while it is intact
        if not _index_ready(index, embeddings) or (changed and step.number > registered):
            index = build_index(state.z, state.ids, index_spec or IndexSpec()).save(gallery_dir, step.index_name)
            done["indexed"].append(step.number)
        if step.number > registered:
            fraction = step.end / total
            registry.reembedded_step(name, index, fraction, f"partial backfill step {step.number}/{len(steps)}: "
                                     f"{step.end} of {total} items re-embedded in {order} order")
            done["registered"].append(step.number)
            if on_step is not None:
                on_step(step.number, fraction)
    entry = registry.gallery(name)
    return {"gallery": gallery_dir, "order": order, "items": total, "steps": len(steps), **done,
            "fraction": entry.reembedded or 0.0, "index": entry.index}


def _registered_step(registry: Registry, name: str, gallery_dir: str, embeddings: str) -> int:
    """The step whose index the registry serves for `name` (0: the transformed gallery's own index)."""
    entry = registry.gallery(name)
    if entry is None or entry.embeddings != embeddings:
        raise RegistryError(f"the registry does not serve the transformed gallery {embeddings} for {name!r} "
                            f"(it serves {None if entry is None else entry.embeddings})")
    index_dir, index_file = entry.index.rsplit("/", 1)
    if index_dir == gallery_dir.rstrip("/") and index_file.startswith(INDEX_PREFIX) and index_file.endswith(".json"):
        return int(index_file[len(INDEX_PREFIX):-len(".json")])
    if entry.transformation is None:
        raise RegistryError(f"gallery {name!r} is not a transformed gallery: nothing to backfill partially")
    return 0


def _embedded(embed: Embed, step: Step, ids: np.ndarray, dim: int) -> np.ndarray:
    z = np.asarray(embed(step, ids))
    if z.shape != (len(ids), dim) or not np.isfinite(z).all():
        raise GalleryError(f"step {step.number}: the new model gave embeddings of shape {z.shape} (finite: "
                           f"{bool(np.isfinite(z).all())}), the gallery needs ({len(ids)}, {dim}), all finite")
    return z


def _index_ready(index: str, embeddings: str) -> bool:
    """The index at `index` (manifest URL) loads with every file intact and holds the gallery's count."""
    from dml_core.gallery.update import check_index

    if not storage.exists(index):
        return False
    try:
        check_index(index, embeddings)
    except RegistryError:
        return False
    return True


def embed_items(model: torch.nn.Module, task: "ShardTask", ids, *, batch_size: int = 256,
                device: torch.device | str = "cpu", on_error: str = "raise", endpoint_url: str | None = None) -> dict:
    """The embeddings of the items `ids` of one dataset shard (only those go through the model), as arrays
    `ids`, `z`, `labels` and `count`; GalleryError naming ids the shard did not yield."""
    from dml_core.data.eval_reader import EvalReader
    from dml_core.data.shard_stream import Batch

    wanted = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    spec = getattr(model, "spec", {}) or {}
    reader = EvalReader([task.url], counts=[task.count], rank=0, world_size=1, batch_size=batch_size,
                        num_workers=0, endpoint_url=endpoint_url, on_error=on_error,
                        image_size=spec.get("image_size"), channels=spec.get("in_channels"))

    def kept():
        for b in reader:
            keep = torch.isin(b.ids, wanted)
            if keep.any():
                yield Batch(b.images[keep], b.labels[keep], b.ids[keep])

    emb = embed_batches(model, kept(), device, allow_empty=True)
    missing = np.setdiff1d(wanted.numpy(), emb.ids.numpy())
    if len(missing):
        raise GalleryError(f"shard {task.url} did not yield {len(missing)} of the ids to re-embed: {missing[:5]}")
    return {"ids": emb.ids.numpy(), "z": emb.z.numpy(), "labels": emb.labels.numpy(), "count": np.asarray(len(emb.ids))}

"""Tiny shard datasets written with `webdataset.TarWriter` as the layout says, for the reader tests
(independent of the shard writer, so the readers are tested against the contract itself). Their manifest
is in the older form another tool would write: no sharding `params` and no `id_range`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import webdataset as wds
from PIL import Image


def image_pixels(sample_id: int, size: int = 8, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(sample_id)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_sample(sample_id: int, label: int, split: str, size: int = 8, channels: int = 1) -> dict:
    meta = {"id": sample_id, "label": label, "class_name": f"class_{label}", "split": split, "source": "test"}
    return {"__key__": f"{sample_id:012d}", "png": png_bytes(image_pixels(sample_id, size, channels)),
            "cls": str(label).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


def write_dataset(root: str, splits: dict, name: str = "toy", version: str = "0123456789ab",
                  size: int = 8, channels: int = 1) -> dict:
    """Write `splits` = {split: (labels, per_class, num_shards)} under root; return {id: sample dict}.

    Samples of a split are dealt round robin into its shards; ids are unique across splits.
    """
    splits = {"train": ((), 0, 0), "eval": ((), 0, 0), "gallery": ((), 0, 0), **splits}
    base = os.path.join(root, "datasets", name, version)
    os.makedirs(base, exist_ok=True)
    everything, next_id, manifest_splits = {}, 1000, {}
    num_classes = 1 + max(max(labels, default=0) for labels, _, _ in splits.values())
    for split, (labels, per_class, num_shards) in splits.items():
        samples = []
        for label in labels:
            for _ in range(per_class):
                samples.append(make_sample(next_id, label, split, size, channels))
                next_id += 1
        shards = []
        for i in range(num_shards):
            part = samples[i::num_shards]
            fname = f"{split}-{i:06d}.tar"
            with wds.TarWriter(os.path.join(base, fname)) as w:
                for s in part:
                    w.write(s)
            with open(os.path.join(base, fname), "rb") as f:
                data = f.read()
            shards.append({"name": fname, "count": len(part), "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        manifest_splits[split] = {"count": len(samples), "classes": {str(c): per_class for c in labels},
                                  "shards": shards}
        everything.update({int(s["__key__"]): s for s in samples})
    manifest = {"name": name, "version": version, "fingerprint": "0" * 64, "source": {"kind": "synthetic"},
                "seed": 0, "num_classes": num_classes, "class_names": [f"class_{c}" for c in range(num_classes)],
                "splits": manifest_splits, "skipped": {"count": 0, "items": []}, "created": "2024-01-01T00:00:00Z"}
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return everything


def truncate(path: str, keep_fraction: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def cut_at_sample(path: str, keep: int) -> int:
    """Truncate a shard at the header of sample number `keep` (0-based), a tar member boundary: what is
    left is a clean tar of `keep` whole samples, as `truncate -s` at that offset leaves it. Returns the size."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == keep + 1:
                    offset = member.offset
                    break
        else:
            raise ValueError(f"{path} has only {len(keys)} samples")
    os.truncate(path, offset)
    return offset


def append_sample(path: str, sample: dict) -> None:
    """Append one whole sample (its members) to a shard's tar."""
    import tarfile

    with tarfile.open(path, "a") as tar:
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

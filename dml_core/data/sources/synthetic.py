"""Synthetic clustered data for scale tests, deterministic from a seed and random-access per item.

kind="embeddings": class centres uniform on the unit sphere in `dim` dimensions; an item is its
centre plus Gaussian noise of std `noise` per dimension, stored as float32 `.npy`.
kind="images": each class has a random coarse 4x4 RGB pattern upsampled to `image_size`; an item
adds uint8 Gaussian noise of std `noise * 255` and a random circular shift of up to 1/8 of the size.
"""
from __future__ import annotations

import numpy as np

from dml_core.data.sources.base import ItemRef, Source, sha256_json


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(self, num_classes: int = 10, per_class: int = 20, kind: str = "embeddings", dim: int = 32,
                 image_size: tuple[int, int] = (32, 32), noise: float = 0.1, seed: int = 0) -> None:
        if kind not in ("embeddings", "images"):
            raise ValueError(f"synthetic kind must be 'embeddings' or 'images', got {kind!r}")
        if num_classes < 1 or per_class < 1:
            raise ValueError(f"need num_classes >= 1 and per_class >= 1, got {num_classes}, {per_class}")
        self.params = {"num_classes": int(num_classes), "per_class": int(per_class), "data": kind, "dim": int(dim),
                       "image_size": [int(image_size[0]), int(image_size[1])], "noise": float(noise),
                       "seed": int(seed)}

    def describe(self) -> dict:
        return {"kind": self.kind, **self.params}

    def list_items(self) -> list[ItemRef]:
        p = self.params
        width = len(str(p["num_classes"] - 1))
        return [ItemRef(f"c{c:0{width}d}#{i:06d}", f"c{c:0{width}d}")
                for c in range(p["num_classes"]) for i in range(p["per_class"])]

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.params["seed"], *keys])

    def load(self, item: ItemRef) -> np.ndarray:
        p = self.params
        c, i = int(item.class_name[1:]), int(item.ref.split("#")[1])
        rng = self._rng(1, c, i)
        if p["data"] == "embeddings":
            centre = self._rng(0, c).standard_normal(p["dim"])
            centre /= np.linalg.norm(centre)
            return (centre + p["noise"] * rng.standard_normal(p["dim"])).astype(np.float32)
        h, w = p["image_size"]
        coarse = self._rng(0, c).integers(0, 256, size=(4, 4, 3)).astype(np.float64)
        base = np.repeat(np.repeat(coarse, -(-h // 4), axis=0), -(-w // 4), axis=1)[:h, :w]
        shift = rng.integers(-max(h // 8, 1), max(h // 8, 1) + 1, size=2)
        image = np.roll(base, tuple(shift), axis=(0, 1)) + p["noise"] * 255 * rng.standard_normal((h, w, 3))
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def fingerprint(self) -> str:
        return sha256_json({"source": "synthetic", "version": 1, **self.params})

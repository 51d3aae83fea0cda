"""IDX files (the MNIST format), plain or gzipped, and Fashion-MNIST as Debian's
`dataset-fashion-mnist` package installs it (/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz).

IDX layout: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), a byte with the number of dimensions, each dimension as a big-endian uint32, then the
data in big-endian C order. Images are stored in shards as PNG (lossless, grayscale).
"""
from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np

from dml_core import storage
from dml_core.data.sources.base import ItemError, ItemRef, Source, SourceError

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes (gunzipped already) into an array of native byte order."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{name}: not an IDX file (bad magic {raw[:4]!r})")
    dtype = IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{name}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{name}: IDX data has {len(raw) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


def read_idx(url: str) -> np.ndarray:
    """Read an IDX file (local or s3://), gunzipping it if it is gzipped."""
    raw = storage.read_bytes(url)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return parse_idx(raw, url)


class IdxSource(Source):
    """Images and labels from IDX file pairs; class names from `class_names[label]` (else the label).

    `pairs` maps a subset name (e.g. "train", "t10k") to (images_url, labels_url). `max_per_class`
    keeps the first n items of each class per subset, in file order (for small deterministic subsets).
    """

    kind = "idx"

    def __init__(self, pairs: dict[str, tuple[str, str]], class_names: list[str] | None = None,
                 max_per_class: int | None = None) -> None:
        self.pairs = {k: (str(v[0]), str(v[1])) for k, v in pairs.items()}
        self.class_names = class_names
        self.max_per_class = max_per_class
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._items: list[ItemRef] | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "files": {k: list(v) for k, v in self.pairs.items()},
                "class_names": self.class_names, "max_per_class": self.max_per_class}

    def _load_subset(self, subset: str) -> tuple[np.ndarray, np.ndarray]:
        if subset not in self._arrays:
            images_url, labels_url = self.pairs[subset]
            for url in (images_url, labels_url):
                if not storage.exists(url):
                    raise SourceError(f"IDX file {url} not found (for Fashion-MNIST: apt-get install dataset-fashion-mnist)")
            try:
                images, labels = read_idx(images_url), read_idx(labels_url)
            except (ValueError, OSError, EOFError) as e:
                raise SourceError(str(e)) from e
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise SourceError(f"{images_url} / {labels_url}: need N x H x W images and N labels, "
                                  f"got {images.shape} and {labels.shape}")
            self._arrays[subset] = (images, labels)
        return self._arrays[subset]

    def _class_name(self, label: int) -> str:
        if self.class_names is None:
            return str(label)
        if not 0 <= label < len(self.class_names):
            raise ItemError(f"label {label} has no class name ({len(self.class_names)} given)")
        return self.class_names[label]

    def list_items(self) -> list[ItemRef]:
        if self._items is None:
            items = []
            for subset in sorted(self.pairs):
                _, labels = self._load_subset(subset)
                taken: dict[int, int] = {}
                for i, label in enumerate(labels.tolist()):
                    if self.max_per_class is not None and taken.get(label, 0) >= self.max_per_class:
                        continue
                    taken[label] = taken.get(label, 0) + 1
                    ref = f"{subset}#{i:06d}"
                    try:
                        items.append(ItemRef(ref, self._class_name(label)))
                    except ItemError as e:
                        items.append(ItemRef(ref, str(label), error=str(e)))
            self._items = items
        return self._items

    def load(self, item: ItemRef) -> np.ndarray:
        subset, index = item.ref.split("#")
        images, _ = self._load_subset(subset)
        image = images[int(index)]
        if image.dtype != np.uint8:
            raise ItemError(f"{item.ref}: IDX images must be uint8 to store as PNG, got {image.dtype}")
        return image

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"idx\0")
        for subset in sorted(self.pairs):
            for url in self.pairs[subset]:
                h.update(f"{subset}\0{hashlib.sha256(storage.read_bytes(url)).hexdigest()}\n".encode())
        h.update(repr((self.class_names, self.max_per_class)).encode())
        return h.hexdigest()


def fashion_mnist(root: str = FASHION_MNIST_DIR, subsets: tuple[str, ...] = ("train", "t10k"),
                  max_per_class: int | None = None) -> IdxSource:
    """Fashion-MNIST (70,000 28x28 grayscale images, 10 classes) from Debian's dataset-fashion-mnist."""
    pairs = {s: (f"{root}/{s}-images-idx3-ubyte.gz", f"{root}/{s}-labels-idx1-ubyte.gz") for s in subsets}
    return IdxSource(pairs, class_names=FASHION_MNIST_CLASSES, max_per_class=max_per_class)

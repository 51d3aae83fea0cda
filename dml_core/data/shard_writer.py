"""Writing samples into size-bounded WebDataset tar shards, each committed atomically via storage.py.

Tars are deterministic (mtime 0, uid/gid 0, mode 0444), so the same samples give the same sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
from PIL import Image, UnidentifiedImageError

from dml_core import storage
from dml_core.data.layout import shard_name
from dml_core.data.manifest import ShardInfo
from dml_core.data.sources.base import ItemError

BLOCK = tarfile.BLOCKSIZE
TAR_OVERHEAD = 2 * BLOCK + tarfile.RECORDSIZE  # end-of-archive blocks plus worst-case record padding


def encode_payload(data, ref: str) -> tuple[str, bytes]:
    """(extension, bytes) for one sample's data; raises ItemError naming `ref` if it is unusable.

    PNG and JPEG bytes are kept as they are (after a full decode to prove they are intact); other image
    formats are re-encoded to PNG; uint8 arrays become PNG; 1-D float arrays become float32 .npy."""
    if isinstance(data, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                image.load()
                if fmt in ("PNG", "JPEG"):
                    return ("png" if fmt == "PNG" else "jpg"), bytes(data)
                if image.mode not in ("L", "LA", "RGB", "RGBA"):
                    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                return "png", _png(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ItemError(f"{ref}: unreadable image ({e})") from e
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and (data.ndim == 2 or (data.ndim == 3 and data.shape[2] in (1, 3, 4))):
            return "png", _png(Image.fromarray(data[:, :, 0] if data.ndim == 3 and data.shape[2] == 1 else data))
        if data.ndim == 1 and np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all():
                raise ItemError(f"{ref}: embedding has NaN or infinite values")
            buf = io.BytesIO()
            np.save(buf, data.astype(np.float32), allow_pickle=False)
            return "npy", buf.getvalue()
        raise ItemError(f"{ref}: unsupported array (dtype {data.dtype}, shape {data.shape}); "
                        "need uint8 HxW[xC] images or 1-D float embeddings")
    raise ItemError(f"{ref}: unsupported data type {type(data).__name__}")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_members(sample_id: int, label: int, class_name: str, split: str, ref: str,
                   ext: str, payload: bytes) -> dict[str, bytes]:
    key = f"{sample_id:012d}"
    meta = {"id": sample_id, "label": label, "class_name": class_name, "split": split, "source": ref}
    return {f"{key}.{ext}": payload, f"{key}.cls": str(label).encode("ascii"),
            f"{key}.json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def member_bytes(members: dict[str, bytes]) -> int:
    return sum(BLOCK + -(-len(v) // BLOCK) * BLOCK for v in members.values())


class _HashingWriter:
    """File wrapper that hashes and counts everything written through it."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


class ShardWriter:
    """Writes one split's samples into `{split}-{000000}.tar` files under `dir_url`, starting a new shard
    before one would pass `max_bytes` or `max_samples` (a single oversized sample gets a shard alone)."""

    def __init__(self, dir_url: str, split: str, max_bytes: int, max_samples: int) -> None:
        if max_bytes <= TAR_OVERHEAD or max_samples < 1:
            raise ValueError(f"max_shard_bytes must exceed {TAR_OVERHEAD} and max_shard_samples be >= 1")
        self.dir_url, self.split, self.max_bytes, self.max_samples = dir_url, split, max_bytes, max_samples
        self.shards: list[ShardInfo] = []
        self._open = None

    def add(self, members: dict[str, bytes]) -> None:
        size = member_bytes(members)
        if self._open and (self._count >= self.max_samples or self._size + size + TAR_OVERHEAD > self.max_bytes):
            self._close()
        if not self._open:
            self._start()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._size += size
        self._count += 1

    def _start(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._open = storage.open_write_atomic(storage.join(self.dir_url, name))
        self._hw = _HashingWriter(self._open.__enter__())
        self._tar = tarfile.open(fileobj=self._hw, mode="w|", format=tarfile.USTAR_FORMAT)
        self._name, self._size, self._count = name, 0, 0

    def _close(self) -> None:
        self._tar.close()
        self._open.__exit__(None, None, None)
        self.shards.append(ShardInfo(self._name, self._count, self._hw.bytes, self._hw.sha.hexdigest()))
        self._open = None

    def close(self) -> list[ShardInfo]:
        """Commit the last shard; return every shard written, in order."""
        if self._open:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed, nothing is committed)."""
        if self._open:
            self._tar.closed = self._tar.fileobj.closed = True  # no end-of-archive write on garbage collection
            try:
                self._open.__exit__(RuntimeError, RuntimeError("aborted"), None)
            finally:
                self._open = None

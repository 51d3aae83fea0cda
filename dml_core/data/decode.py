"""Safe decoding of one WebDataset sample (members as in layout.py): images via Pillow, `.npy` without
pickle, `.cls` and `.json` as text. Nothing from a shard is ever unpickled.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from dml_core.data.layout import DATA_MEMBERS, IMAGE_MEMBERS, SAMPLE_MEMBERS

# Members that could only be read by unpickling: always refused, whatever `strict` says.
PICKLE_MEMBERS = ("pickle", "pkl", "pyd", "pth", "pt", "pck", "torch", "joblib")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class SampleDecodeError(ValueError):
    """A sample that does not follow the shard format; the message names the shard and key."""


@dataclass
class DecodedSample:
    image: torch.Tensor  # C x H x W float32 in [0, 1] for images; the float32 array for `.npy` samples
    label: int
    id: int
    meta: dict = field(default_factory=dict)


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')!r}"


def check_extensions(sample: dict, strict: bool = False) -> None:
    """Refuse pickle-like members always, and any other unknown member when `strict`."""
    for ext in sample:
        if ext.startswith("__"):
            continue
        last = ext.lower().rsplit(".", 1)[-1]
        if last in PICKLE_MEMBERS:
            raise SampleDecodeError(f"{_where(sample)}: member '.{ext}' needs unpickling, which is refused")
        if strict and ext.lower() not in SAMPLE_MEMBERS:
            raise SampleDecodeError(f"{_where(sample)}: unknown member '.{ext}' (known: {SAMPLE_MEMBERS})")


def decode_label(sample: dict) -> int:
    """The integer label from the `.cls` member (cheap: used before image decoding, e.g. for P x K)."""
    raw = sample.get("cls")
    if raw is None:
        raise SampleDecodeError(f"{_where(sample)}: missing '.cls' member")
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exn:
        raise SampleDecodeError(f"{_where(sample)}: '.cls' is not an ASCII integer: {raw[:32]!r}") from exn


def decode_id(sample: dict, meta: dict | None = None) -> int:
    """The stable sample id: `id` in `.json`, else the key; both must agree when both exist."""
    key = sample.get("__key__")
    key_id = None
    if key is not None:
        base = str(key).rsplit("/", 1)[-1]
        key_id = int(base) if base.isdigit() else None
    meta_id = None if meta is None else meta.get("id")
    if meta_id is not None and not isinstance(meta_id, int):
        raise SampleDecodeError(f"{_where(sample)}: json 'id' is not an integer: {meta_id!r}")
    if meta_id is not None and key_id is not None and meta_id != key_id:
        raise SampleDecodeError(f"{_where(sample)}: json id {meta_id} does not match the key")
    out = meta_id if meta_id is not None else key_id
    if out is None:
        raise SampleDecodeError(f"{_where(sample)}: no sample id (no json 'id' and the key is not an integer)")
    return out


def decode_json(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleDecodeError(f"{_where(sample)}: '.json' is not UTF-8 JSON: {exn}") from exn
    if not isinstance(meta, dict):
        raise SampleDecodeError(f"{_where(sample)}: '.json' must hold an object, got {type(meta).__name__}")
    return meta


def decode_npy(data: bytes, where: str = "npy") -> torch.Tensor:
    """A numeric `.npy` array as a float32 tensor; object arrays (which need pickle) are refused."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exn:
        raise SampleDecodeError(f"{where}: '.npy' could not be read without pickle: {exn}") from exn
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise SampleDecodeError(f"{where}: '.npy' has non-numeric dtype {arr.dtype}")
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(out).all():
        raise SampleDecodeError(f"{where}: '.npy' holds NaN or Inf")
    return out


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, image_size: int | None = None, channels: int | None = None,
                 where: str = "image") -> torch.Tensor:
    """Image bytes -> C x H x W float32 in [0, 1]. `channels` 1 or 3 converts; None keeps gray as 1, else 3.

    `image_size` resizes the shorter side and centre-crops to a square, so a batch can be stacked.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.mode in _GRAYSCALE_MODES
            want = channels if channels is not None else (1 if gray else 3)
            if want not in (1, 3):
                raise SampleDecodeError(f"{where}: channels must be 1 or 3, got {want}")
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") and want == 1:
                arr = np.asarray(img.convert("F"), dtype=np.float32)
                peak = 65535.0 if img.mode.startswith("I") else 1.0
                img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
            img = img.convert("L" if want == 1 else "RGB")
            if image_size is not None:
                img = _resize_center_crop(img, image_size)
            arr = np.asarray(img, dtype=np.uint8)
    except SampleDecodeError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise SampleDecodeError(f"{where}: image could not be decoded: {exn}") from exn
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div_(255.0)


def decode_sample(sample: dict, image_size: int | None = None, channels: int | None = None,
                  strict: bool = False) -> DecodedSample:
    """Decode one raw sample (dict of extension -> bytes, plus `__key__`/`__url__`)."""
    check_extensions(sample, strict=strict)
    meta = decode_json(sample)
    label = decode_label(sample)
    if "label" in meta and meta["label"] != label:
        raise SampleDecodeError(f"{_where(sample)}: '.cls' label {label} != json label {meta['label']}")
    sid = decode_id(sample, meta)
    images = [e for e in IMAGE_MEMBERS if e in sample]
    if len(images) + ("npy" in sample) != 1:
        raise SampleDecodeError(f"{_where(sample)}: needs exactly one of {'/'.join('.' + e for e in DATA_MEMBERS)}, "
                                f"has {sorted(k for k in sample if not k.startswith('__'))}")
    if "npy" in sample:
        image = decode_npy(sample["npy"], where=_where(sample))
    else:
        image = decode_image(sample[images[0]], image_size, channels, where=_where(sample))
    return DecodedSample(image=image, label=label, id=sid, meta=meta)

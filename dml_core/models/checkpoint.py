"""Save and load an EmbeddingModel as {spec, state_dict}: plain tensors and primitives only, so loading
uses torch.load(weights_only=True) and never runs pickled code."""
from __future__ import annotations

import copy
import io
import os
from typing import Any

import torch

from dml_core import storage
from dml_core.models.head import EmbeddingModel
from dml_core.models.registry import build_model


def model_checkpoint(model: EmbeddingModel) -> dict[str, Any]:
    """The model as a dict that `load_model` accepts (spec from build_model + CPU state dict)."""
    if not model.spec:
        raise ValueError("model has no spec (it was not made by build_model), so it cannot be rebuilt on load")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"spec": copy.deepcopy(model.spec), "state_dict": state}  # editing it leaves the model's spec alone


def save_model(model: EmbeddingModel, url: str) -> None:
    """Write the checkpoint atomically to a local path or s3:// URL."""
    buf = io.BytesIO()
    torch.save(model_checkpoint(model), buf)
    storage.write_bytes_atomic(url, buf.getvalue())


def read_checkpoint(source: str | os.PathLike | bytes | io.IOBase) -> dict[str, Any]:
    """Load a checkpoint dict from a path/URL, raw bytes or a binary file object, weights only."""
    if isinstance(source, (str, os.PathLike)):
        source = storage.read_bytes(os.fspath(source))
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=True)


def load_model(source: str | os.PathLike | bytes | io.IOBase | dict) -> EmbeddingModel:
    """Rebuild the model from its spec and load its weights (strict: every key must match)."""
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"not a model checkpoint: expected keys 'spec' and 'state_dict', got {keys}")
    spec = dict(ckpt["spec"])
    kwargs = dict(spec.pop("kwargs", {}) or {})
    name = spec.pop("name")
    model = build_model(name, **spec, **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model

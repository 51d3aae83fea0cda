"""Save and load an EmbeddingModel as {spec, state_dict}: plain tensors and primitives only, so loading
uses torch.load(weights_only=True) and never runs pickled code."""
from __future__ import annotations

import copy
import io
import os
import pickle
import re
from typing import Any

import torch

from dml_core import storage
from dml_core.models.head import EmbeddingModel
from dml_core.models.registry import build_model


class CheckpointError(ValueError):
    """A checkpoint file that does not load: truncated, not a checkpoint, or holding objects that weights-only
    loading refuses. The message names the file and never suggests loading it unsafely."""


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
    """Load a checkpoint from a path/URL, raw bytes or a binary file object, weights only (the project's one
    `torch.load`); one that does not load raises CheckpointError naming it."""
    name = "(bytes)"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        source = storage.read_bytes(name)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message advises loading with weights_only=False: never repeat it
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            why = (f"holds objects that weights-only loading refuses (it refers to {refused[1]}; the file may be "
                   "unsafe and was not loaded)")
        else:
            detail = str(e).strip().split("\n", 1)[0].split(". ", 1)[0]
            why = f"is truncated or not a checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"
        raise CheckpointError(f"checkpoint {name} {why}") from None  # no cause: a traceback would show the advice


def load_model(source: str | os.PathLike | bytes | io.IOBase | dict) -> EmbeddingModel:
    """Rebuild the model from its spec and load its weights (strict: every key must match)."""
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        where = f"{os.fspath(source)} is " if isinstance(source, (str, os.PathLike)) else ""
        raise CheckpointError(f"{where}not a model checkpoint: expected keys 'spec' and 'state_dict', got {keys}")
    spec = dict(ckpt["spec"])
    kwargs = dict(spec.pop("kwargs", {}) or {})
    name = spec.pop("name")
    model = build_model(name, **spec, **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model

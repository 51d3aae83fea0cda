"""The evaluation stage: embed the dataset's evaluation split with the new model and with the registry's
gallery model, evaluate (retrieval, OPIS, compatibility, the update gate: `evaluate_embeddings`), and write
everything a reader needs to check it into `<run.root>/runs/<run.name>/evaluation/`: the embeddings
(`embeddings.npz`), `metrics.json`, the report (`report.json`), the utility plot and `summary.json`."""
from __future__ import annotations

import io
import json

import numpy as np

from dml_core import storage
from dml_core.config import Config
from dml_core.data.manifest import Manifest
from dml_core.gallery.registry import ModelRef
from dml_core.metrics.evaluate import evaluate_embeddings
from dml_core.metrics.gate import UpdateGate
from dml_core.metrics.summary import flat_metrics, summary_row
from dml_core.training.embed import Embeddings, embed_with_config

EVALUATION = "evaluation"
KS = (1, 5, 10)
FILES = {"embeddings": "embeddings.npz", "metrics": "metrics.json", "report": "report.json",
         "plot": "utility.png", "summary": "summary.json"}


def evaluation_dir(cfg: Config) -> str:
    return storage.join(cfg.run_dir, EVALUATION)


def save_embeddings(url: str, new: Embeddings, old: Embeddings | None) -> None:
    """The evaluation's inputs: new (and old) model's embeddings of the same items, labels, sample ids."""
    arrays = {"z": new.z.numpy(), "labels": new.labels.numpy(), "ids": new.ids.numpy()}
    if old is not None:
        arrays["old_z"] = old.z.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(url, buf.getvalue())


def write_json(url: str, data: dict) -> None:
    storage.write_bytes_atomic(url, json.dumps(data, indent=1).encode())


def run_evaluation(cfg: Config, checkpoint: str, old: ModelRef | None, version: str | None = None) -> dict:
    """Evaluate the model of `checkpoint` (named `version`, default the run's name) against `old` (the
    gallery model; None before the gallery's first model). Returns {"dir", "files", "metrics", "summary"};
    the summary's verdict is the gate's (what the update will do), "first model" without an old model."""
    storage.use_endpoint(cfg.storage.endpoint_url)
    storage.use_retry_seconds(cfg.storage.retry_seconds)
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    new = embed_with_config(cfg, checkpoint, manifest)
    old_emb = embed_with_config(cfg, old.checkpoint, manifest) if old is not None else None
    if old_emb is not None and not np.array_equal(old_emb.ids.numpy(), new.ids.numpy()):
        raise RuntimeError(f"the old and new model embedded different items of {manifest.url} (eval split)")
    out = evaluation_dir(cfg)
    files = {k: storage.join(out, v) for k, v in FILES.items()}
    save_embeddings(files["embeddings"], new, old_emb)
    report = evaluate_embeddings(new.z, new.labels, ks=KS, old_z=None if old_emb is None else old_emb.z,
                                 gate=UpdateGate(cfg.gate.max_nfr, cfg.gate.min_gain, cfg.gate.metric),
                                 plot_url=files["plot"])
    model_version = version or cfg.run.name
    gallery_model = None if old is None else old.version
    metrics = {"run": cfg.run.name, "model_version": model_version, "checkpoint": checkpoint,
               "gallery_model": gallery_model, "gallery_checkpoint": None if old is None else old.checkpoint,
               "dataset": {"name": manifest.name, "version": manifest.version, "split": "eval"},
               **flat_metrics(report)}
    report.meta.update({k: metrics[k] for k in ("run", "model_version", "gallery_model", "dataset")})
    storage.write_bytes_atomic(files["report"], report.to_json().encode())
    write_json(files["metrics"], metrics)
    summary = summary_row(cfg.run.name, model_version, gallery_model, metrics, cfg.gate.metric)
    write_json(files["summary"], summary)
    return {"dir": out, "files": files, "metrics": metrics, "summary": summary}

"""The evaluation stage: embed the dataset's evaluation split with the new model, the registry's gallery
model (and, in a chain, its served query model), measure the raw-pixel floor of the split, evaluate
(retrieval, OPIS, compatibility, the update gate: `evaluate_embeddings`), and write everything a reader needs
to check it into `<run.root>/runs/<run.name>/evaluation/`: the embeddings (`embeddings.npz`), `metrics.json`,
the report (`report.json`), the utility plot and `summary.json`."""
from __future__ import annotations

import io
import json

import numpy as np
import torch

from dml_core import storage
from dml_core.config import Config
from dml_core.data.manifest import Manifest
from dml_core.gallery.registry import ModelRef
from dml_core.metrics.evaluate import evaluate_embeddings
from dml_core.metrics.floor import pixel_floor
from dml_core.metrics.gate import UpdateGate
from dml_core.metrics.summary import flat_metrics, summary_row
from dml_core.training.embed import Embeddings, embed_with_config, read_model_spec
from tasks.transform import TrainedTransformation

EVALUATION = "evaluation"
KS = (1, 5, 10)
FILES = {"embeddings": "embeddings.npz", "metrics": "metrics.json", "report": "report.json",
         "plot": "utility.png", "summary": "summary.json"}


def evaluation_dir(cfg: Config) -> str:
    return storage.join(cfg.run_dir, EVALUATION)


def save_embeddings(url: str, new: Embeddings, old: Embeddings | None, served: Embeddings | None = None,
                    transformed: torch.Tensor | None = None) -> None:
    """The evaluation's inputs: new (and old, served, h(old)) embeddings of the same items, labels, sample ids."""
    arrays = {"z": new.z.numpy(), "labels": new.labels.numpy(), "ids": new.ids.numpy()}
    for name, z in (("old_z", old and old.z), ("served_z", served and served.z), ("transformed_z", transformed)):
        if z is not None:
            arrays[name] = z.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(url, buf.getvalue())


def write_json(url: str, data: dict) -> None:
    storage.write_bytes_atomic(url, json.dumps(data, indent=1).encode())


def config_floor(cfg: Config, manifest: Manifest, checkpoint: str, split: str = "eval") -> dict:
    """The raw-pixel floor of `split` at the input size of `checkpoint`'s model (cached per dataset version)."""
    spec = read_model_spec(checkpoint)
    return pixel_floor(manifest, split, image_size=spec.get("image_size"), channels=spec.get("in_channels"), ks=KS,
                       batch_size=cfg.data.eval_batch_size, endpoint_url=cfg.storage.endpoint_url,
                       on_error=cfg.data.on_error)


def config_gate(cfg: Config) -> UpdateGate:
    return UpdateGate(cfg.gate.max_nfr, cfg.gate.min_gain, cfg.gate.metric, cfg.gate.min_improvement)


def embed_models(cfg: Config, manifest: Manifest, checkpoint: str, old: ModelRef | None,
                 served: ModelRef | None) -> tuple[Embeddings, Embeddings | None, Embeddings | None]:
    """The eval split embedded by the new model, by `old` and by `served` (None unless it differs from `old`)."""
    new = embed_with_config(cfg, checkpoint, manifest)
    others = {name: embed_with_config(cfg, m.checkpoint, manifest)
              for name, m in (("old", old), ("served", served if old is not None and served != old else None)) if m}
    for name, emb in others.items():
        if not np.array_equal(emb.ids.numpy(), new.ids.numpy()):
            raise RuntimeError(f"the {name} and new model embedded different items of {manifest.url} (eval split)")
    return new, others.get("old"), others.get("served")


def transformed_embeddings(cfg: Config, manifest: Manifest, old: Embeddings | None,
                           h: TrainedTransformation | None) -> torch.Tensor | None:
    """h applied to the old model's embeddings of the eval split, with its side-info model's of the same items;
    None without an old model or an h."""
    if old is None or h is None:
        return None
    from dml_core.models.transformation import load_transformation
    from dml_core.training.transformation import apply_transformation

    side_z = None
    if h.side_info is not None:
        side_emb = embed_with_config(cfg, h.side_info, manifest)
        if not np.array_equal(side_emb.ids.numpy(), old.ids.numpy()):
            raise RuntimeError(f"the side-info and old model embedded different items of {manifest.url} (eval split)")
        side_z = side_emb.z
    return apply_transformation(load_transformation(h.model.checkpoint), old.z, side_z)[0]


def run_evaluation(cfg: Config, checkpoint: str, old: ModelRef | None, version: str | None = None,
                   served: ModelRef | None = None, transformation: TrainedTransformation | None = None) -> dict:
    """Evaluate the model of `checkpoint` (named `version`, default the run's name) against `old` (the
    gallery model; None before the gallery's first model), `served` (the registry's query model, when a
    chain serves another model than `old`) and, with a `transformation` h, the old gallery transformed by h. Returns {"dir", "files", "metrics", "summary"}; the summary's verdict is the
    gate's (what the update will do)."""
    storage.configure(cfg.storage)
    manifest = Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    new, old_emb, served_emb = embed_models(cfg, manifest, checkpoint, old, served)
    transformed = transformed_embeddings(cfg, manifest, old_emb, transformation)
    out = evaluation_dir(cfg)
    files = {k: storage.join(out, v) for k, v in FILES.items()}
    save_embeddings(files["embeddings"], new, old_emb, served_emb, transformed)
    report = evaluate_embeddings(new.z, new.labels, ks=KS, old_z=None if old_emb is None else old_emb.z,
                                 served_z=None if served_emb is None else served_emb.z, transformed_z=transformed,
                                 floor=config_floor(cfg, manifest, checkpoint), gate=config_gate(cfg),
                                 plot_url=files["plot"])
    model_version = version or cfg.run.name
    gallery_model = None if old is None else old.version
    metrics = {"run": cfg.run.name, "model_version": model_version, "checkpoint": checkpoint,
               "gallery_model": gallery_model, "gallery_checkpoint": None if old is None else old.checkpoint,
               "served_query_model": None if served_emb is None else served.version,
               "transformation": transformation and transformation.model.version,
               "dataset": {"name": manifest.name, "version": manifest.version, "split": "eval"},
               **flat_metrics(report)}
    report.meta.update({k: metrics[k] for k in ("run", "model_version", "gallery_model", "dataset")})
    storage.write_bytes_atomic(files["report"], report.to_json().encode())
    write_json(files["metrics"], metrics)
    summary = summary_row(cfg.run.name, model_version, gallery_model, metrics, cfg.gate.metric)
    write_json(files["summary"], summary)
    return {"dir": out, "files": files, "metrics": metrics, "summary": summary}

"""Typed configuration of one run, loaded from one YAML file and validated at load time.

Every error names the offending field (`loss.tcm.m_pos`) and the file, so a bad config fails before any
worker starts. The defaults run on one laptop: local storage, in-process Ray, two CPU workers.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

BASE_LOSSES = ("info_nce", "decomposable")
OBJECTIVES = ("supervised", "self_supervised")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


@dataclass
class RunSection:
    name: str = "run"
    root: str = "./dml_storage"  # storage root: local directory (made absolute at load) or s3://bucket/prefix


@dataclass
class DataSection:
    dataset: str = "fashion_mnist"
    version: Optional[str] = None  # None: the only version under <root>/datasets/<dataset>/
    root: Optional[str] = None  # None: run.root
    batch_size: int = 64  # per worker; supervised: must equal p * k; self-supervised: images (x2 views)
    p: Optional[int] = 16  # classes per batch (P x K sampling, supervised objective)
    k: Optional[int] = 4  # samples per class
    loader_workers: int = 0
    augment: bool = False
    eval_batch_size: int = 256


@dataclass
class ModelSection:
    backbone: str = "small_cnn"
    embedding_dim: int = 128
    image_size: int = 28
    in_channels: int = 1
    # e.g. small_cnn: {widths: [16, 32]}. small_cnn / resnet*: `norm` is batch (default), frozen_batch or group
    # (small_cnn also none); gradient caching needs frozen_batch or group (METHODS.md 1.4)
    backbone_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TCMSection:
    m_pos: float = 0.9
    m_neg: float = 0.5
    lambda_pos: float = 1.0
    lambda_neg: float = 1.0


@dataclass
class BCTSection:
    old_checkpoint: str = ""  # a checkpoint directory (local or s3://) written by this pipeline
    lambda_bct: float = 1.0
    tau_bct: float = 0.05


@dataclass
class LossSection:
    base: str = "info_nce"
    objective: str = "supervised"
    tau: float = 0.1
    tile_size: int = 1024
    tiled_above: int = 8192
    gamma: float = 0.1  # decomposable only: E-step rate; 0.1 was best in benchmarks/decomposable_bias.py
    gamma_shape: Optional[float] = None  # decomposable only; None = deterministic u
    tcm: Optional[TCMSection] = None
    bct: Optional[BCTSection] = None


@dataclass
class TrainSection:
    steps: int = 300
    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    grad_cache_chunk: Optional[int] = None  # None: no gradient caching
    checkpoint_every: int = 100
    keep_best: int = 2  # checkpoints kept, ranked by loss_avg (mean training loss since the previous one) + the latest
    seed: int = 0
    log_every: int = 10


@dataclass
class RaySection:
    address: Optional[str] = None  # None: in-process Ray; "auto" or "host:port" joins a cluster
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    max_failures: int = 2


@dataclass
class StorageSection:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (SeaweedFS, MinIO); None: AWS_ENDPOINT_URL


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    ray: RaySection = field(default_factory=RaySection)
    storage: StorageSection = field(default_factory=StorageSection)

    @property
    def data_root(self) -> str:
        return self.data.root or self.run.root

    @property
    def run_dir(self) -> str:
        """`<run.root>/runs/<run.name>`: the run's config, metrics and checkpoints."""
        return self.run.root.rstrip("/") + "/runs/" + self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------ loading ---------------------

def load_config(path: str, overrides: dict | None = None) -> Config:
    """Read one YAML file (local path or any storage URL) into a validated `Config`."""
    from dml_core import storage

    try:
        text = storage.read_bytes(str(path)).decode("utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if overrides:
        raw = _deep_merge(raw, overrides)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a `Config` from plain data (a parsed YAML file or `Config.to_dict()`)."""
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg, source)
    _absolute_local_paths(cfg)
    return cfg


def _absolute_local_paths(cfg: Config) -> None:
    """Relative local roots become absolute, here in the caller's working directory: Ray's workers run
    elsewhere and would not find `./dml_storage`."""
    from dml_core import storage

    def absolute(url: str | None) -> str | None:
        return storage.local_path(url) if url and storage.is_local(url) else url

    cfg.run.root, cfg.data.root = absolute(cfg.run.root), absolute(cfg.data.root)
    if cfg.loss.bct is not None:
        cfg.loss.bct.old_checkpoint = absolute(cfg.loss.bct.old_checkpoint)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + str(u) for u in unknown)}; "
                          f"allowed in {where}: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value, name: str, source: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name, source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, name + ".", source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{name}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{source}: {name} must be {getattr(tp, '__name__', tp)}, got {value!r}")


# ------------------------------------------------------------------ validation ------------------

def validate(cfg: Config, source: str = "config") -> None:
    """Value checks that types alone cannot express; raises `ConfigError` naming the field."""
    def bad(name: str, msg: str) -> None:
        raise ConfigError(f"{source}: {name} {msg}")

    def positive(name: str, v) -> None:
        if v is not None and v <= 0:
            bad(name, f"must be > 0, got {v}")

    if not cfg.run.name or "/" in cfg.run.name:
        bad("run.name", f"must be a non-empty name without '/', got {cfg.run.name!r}")
    if cfg.loss.base not in BASE_LOSSES:
        bad("loss.base", f"is unknown: {cfg.loss.base!r}; known: {', '.join(BASE_LOSSES)}")
    if cfg.loss.objective not in OBJECTIVES:
        bad("loss.objective", f"is unknown: {cfg.loss.objective!r}; known: {', '.join(OBJECTIVES)}")
    _check_backbone(cfg.model.backbone, bad)
    for name in ("data.batch_size", "data.p", "data.k", "data.eval_batch_size", "model.embedding_dim",
                 "model.image_size", "model.in_channels", "loss.tau", "loss.tile_size", "loss.tiled_above",
                 "loss.gamma_shape", "train.steps", "train.lr", "train.grad_cache_chunk",
                 "train.checkpoint_every", "train.keep_best", "train.log_every", "ray.num_workers"):
        section, key = name.split(".")
        positive(name, getattr(getattr(cfg, section), key))
    if not 0 < cfg.loss.gamma <= 1:
        bad("loss.gamma", f"must be in (0, 1], got {cfg.loss.gamma}")
    for name, v in (("data.loader_workers", cfg.data.loader_workers), ("train.warmup_steps", cfg.train.warmup_steps),
                    ("train.weight_decay", cfg.train.weight_decay), ("ray.max_failures", cfg.ray.max_failures)):
        if v < 0:
            bad(name, f"must be >= 0, got {v}")
    if (cfg.data.p is None) != (cfg.data.k is None):
        bad("data.p", "and data.k must be set together (P x K sampling) or both left null")
    if cfg.loss.objective == "supervised" and cfg.data.p is None:
        bad("data.p", "and data.k are required for the supervised objective (P x K batches)")
    if cfg.loss.objective == "supervised" and cfg.data.p * cfg.data.k != cfg.data.batch_size:
        bad("data.batch_size", f"must equal data.p * data.k = {cfg.data.p * cfg.data.k}, got {cfg.data.batch_size}")
    if cfg.loss.objective == "supervised" and cfg.data.k < 2:
        bad("data.k", "must be >= 2 for the supervised objective (each anchor needs a positive)")
    if cfg.loss.bct is not None and cfg.loss.objective != "supervised":
        bad("loss.bct", "needs loss.objective: supervised (class labels are the BCT targets)")
    if cfg.loss.tcm is not None:
        from dml_core.losses import tcm

        _term_check("loss.tcm", lambda: tcm.check_params(**dataclasses.asdict(cfg.loss.tcm)), bad)
    if cfg.loss.bct is not None:
        from dml_core.losses import bct

        if not cfg.loss.bct.old_checkpoint:
            bad("loss.bct.old_checkpoint", "must name the old model's checkpoint directory")
        _term_check("loss.bct", lambda: bct.check_params(cfg.loss.bct.lambda_bct, cfg.loss.bct.tau_bct), bad)
    if cfg.train.grad_cache_chunk is not None and cfg.train.grad_cache_chunk > cfg.data.batch_size:
        bad("train.grad_cache_chunk", "must not exceed data.batch_size")
    _check_norm(cfg, bad)
    for res, amount in cfg.ray.resources_per_worker.items():
        if amount < 0:
            bad(f"ray.resources_per_worker.{res}", f"must be >= 0, got {amount}")


def _term_check(name: str, check, bad) -> None:
    """Run a loss term's own parameter check, reporting its failure under the config field."""
    try:
        check()
    except ValueError as e:
        bad(name, f"is invalid: {e}")


def _check_norm(cfg: Config, bad) -> None:
    """`model.backbone_options.norm` of the built-in backbones, and gradient caching only with per-sample
    normalisation (METHODS.md 1.4: BatchNorm in training mode is not exact in chunks)."""
    from dml_core.models.norm import NORMS
    from dml_core.models.registry import BACKBONES, DEFAULT_NORM, NORM_BACKBONES
    from dml_core.models.small_cnn import SMALL_CNN_NORMS

    backbone, options = cfg.model.backbone, cfg.model.backbone_options
    if backbone in NORM_BACKBONES:
        allowed = SMALL_CNN_NORMS if backbone == "small_cnn" else NORMS
        norm = options.get("norm", DEFAULT_NORM)
        if norm not in allowed:
            bad("model.backbone_options.norm", f"must be one of {', '.join(sorted(allowed))}, got {norm!r}")
        if cfg.train.grad_cache_chunk is not None and norm == "batch":
            default = "" if "norm" in options else f" ({backbone}'s default)"
            bad("train.grad_cache_chunk",
                f"with model.backbone_options.norm=batch{default}: BatchNorm in training mode makes a "
                "chunked step differ from the full batch (statistics per chunk); set model.backbone_options.norm "
                "to group or frozen_batch, or drop train.grad_cache_chunk")
    elif backbone in BACKBONES and "norm" in options:
        bad("model.backbone_options.norm", f"is not an option of {backbone} (it uses LayerNorm, per-sample); "
                                           f"backbones with a norm option: {', '.join(NORM_BACKBONES)}")


def _check_backbone(name: str, bad) -> None:
    from dml_core.models.registry import BACKBONES, EXTERNAL_PREFIXES, known_models

    if name in BACKBONES or (name.startswith(EXTERNAL_PREFIXES) and name.split(":", 1)[1]):
        return
    bad("model.backbone", f"is unknown: {name!r}; known: {', '.join(known_models())}")

"""Typed configuration of one run, loaded from one YAML file and validated at load time.

Every error names the offending field (`loss.tcm.m_pos`) and the file, so a bad config fails before any
worker starts. The defaults run on one laptop: local storage, in-process Ray, two CPU workers.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from dml_core import yaml12

PROXY_LOSSES = ("arcface", "cosface", "proxy_anchor")  # base losses over learnable class proxies (METHODS 2.1)
BASE_LOSSES = ("info_nce", "decomposable", *PROXY_LOSSES)
RAY_TEMP_DIR_MAX_LEN = 40  # Unix socket paths hold ~107 bytes; Ray appends about 60 to its temp dir
OBJECTIVES = ("supervised", "self_supervised")
# loss.bct.old_checkpoint and train.init_checkpoint: the registry's gallery model (resolved by the flows)
FROM_GALLERY = "gallery"


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


@dataclass
class RunSection:
    name: str = "run"  # the training run: <run.root>/runs/<name>/; the same name again resumes it
    root: str = "./dml_storage"  # storage root: local directory (made absolute at load) or s3://bucket/prefix
    lease_seconds: float = 60.0  # a driver's run lease expires this long after its last heartbeat (every third)
    allow_config_change: bool = False  # resume even if the model/loss/data fields differ from the saved config
    # start the run over: what an earlier attempt left in the run dir (checkpoints, config.yaml, metrics.jsonl, ...)
    # is moved to <run dir>/replaced-<UTC time>/ first, nothing deleted
    fresh_start: bool = False


@dataclass
class ShardingSection:
    """How `dml shard` splits and shards `data.source` (dml_core.data.sharding); part of the dataset version."""
    seed: int = 0  # which classes are held out and how items are shuffled
    eval_class_fraction: float = 0.5  # classes held out of training, split into eval queries and gallery
    gallery_fraction: float = 0.5  # of each held-out class's items, the share that goes to the gallery
    max_shard_samples: int = 10_000  # samples per WebDataset shard (tar file)


@dataclass
class DataSection:
    dataset: str = "fashion_mnist"  # the dataset's name: <data.root>/datasets/<dataset>/<version>/
    version: Optional[str] = None  # None: the only version under <root>/datasets/<dataset>/
    root: Optional[str] = None  # None: run.root
    batch_size: int = 64  # per worker; supervised: must equal p * k; self-supervised: images (x2 views)
    p: Optional[int] = 16  # classes per batch (P x K sampling, supervised objective)
    k: Optional[int] = 4  # samples per class
    loader_workers: int = 0  # DataLoader worker processes per training worker (0: read in the training process)
    augment: bool = False  # random crop/flip augmentation of training images (two views when self-supervised)
    eval_batch_size: int = 256  # batch size when embedding the evaluation split
    # train on the first N classes of the training split (by label); None: all. For an old model that saw
    # fewer classes than its successor (backward-compatible training experiments)
    train_classes: Optional[int] = None
    # a bad shard (unreadable, or not the manifest's size or sample count) or sample: stop the run naming it,
    # or skip it and count it (metrics.jsonl, the run's result, the console)
    on_error: Literal["raise", "skip"] = "raise"
    # what `dml shard` reads: `kind` (dml_core/data/sources/from_config.py) and that source's options
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "fashion_mnist"})
    sharding: ShardingSection = field(default_factory=ShardingSection)


@dataclass
class ModelSection:
    backbone: str = "small_cnn"  # small_cnn, resnet18/34/50/101, vit_tiny, ... (dml_core/models/registry.py)
    embedding_dim: int = 128  # of the L2-normalised embedding; old and new models must agree for BCT and the gate
    image_size: int = 28  # images are resized to this square size
    in_channels: int = 1  # 1 (grey) or 3 (RGB); images are converted
    # e.g. small_cnn: {widths: [16, 32]}. small_cnn / resnet*: `norm` is batch (default), frozen_batch or group
    # (small_cnn also none); gradient caching needs frozen_batch or group (METHODS.md 1.4)
    backbone_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TCMSection:
    """The TCM regulariser (METHODS.md 2), added to the base loss; off when absent."""
    m_pos: float = 0.9  # positive pairs less similar than this are penalised
    m_neg: float = 0.5  # negative pairs more similar than this are penalised
    lambda_pos: float = 1.0  # weight of the positive-pair term
    lambda_neg: float = 1.0  # weight of the negative-pair term


@dataclass
class BCTSection:
    """Backward-compatible training (METHODS.md 3) against an old model; off when absent."""
    old_checkpoint: str = ""  # a checkpoint directory (local or s3://), or `gallery`: the registry's gallery model
    lambda_bct: float = 1.0  # weight of the BCT term
    tau_bct: float = 0.05  # temperature of the old-prototype classifier


@dataclass
class PCSection:
    """Positive-congruent distillation (METHODS.md 3.1) against loss.bct's old model; off when absent."""
    lambda_pc: float = 1.0  # weight of the PC term
    alpha: float = 1.0  # focal weight of every sample
    beta: float = 5.0  # extra focal weight where the old model classifies the sample right
    tau_pc: float = 0.05  # distillation temperature
    # the old model's embeddings: computed once per run from the training split (precomputed) or by the old
    # model on every batch (on_the_fly); auto: precomputed, on_the_fly with data.augment (augmented images)
    old_embeddings: Literal["auto", "precomputed", "on_the_fly"] = "auto"


@dataclass
class LossSection:
    # info_nce (METHODS.md 1.1), decomposable (1.5), or a loss over class proxies (2.1): arcface, cosface,
    # proxy_anchor (supervised objective only)
    base: str = "info_nce"
    objective: str = "supervised"  # supervised (labels, P x K batches) or self_supervised (two views per image)
    tau: float = 0.1  # temperature of the base loss (info_nce, decomposable)
    tile_size: int = 1024  # rows per tile of the tiled loss (METHODS.md 1.3)
    tiled_above: int = 8192  # global batches larger than this use the tiled loss
    gamma: float = 0.1  # decomposable only: E-step rate; 0.1 was best in benchmarks/decomposable_bias.py
    gamma_shape: Optional[float] = None  # decomposable only; None = deterministic u
    s: float = 64.0  # arcface / cosface only: scale of the logits
    # arcface / cosface only: margin (arcface: an angle in radians); None: METHODS.md's default,
    m: Optional[float] = None  # 0.5 for arcface, 0.35 for cosface
    alpha: float = 32.0  # proxy_anchor only: scale
    delta: float = 0.1  # proxy_anchor only: margin
    proxy_lr_mult: float = 100.0  # arcface / cosface / proxy_anchor: the class proxies learn at train.lr times this
    tcm: Optional[TCMSection] = None  # the TCM regulariser (METHODS.md 2); off when absent
    bct: Optional[BCTSection] = None  # backward-compatible training (METHODS.md 3); off when absent
    pc: Optional[PCSection] = None  # positive-congruent distillation (METHODS.md 3.1); needs loss.bct


@dataclass
class TrainSection:
    steps: int = 300  # optimiser steps (each over the global batch)
    lr: float = 1e-3  # AdamW learning rate
    schedule: Literal["constant", "cosine"] = "cosine"  # learning-rate schedule after the warm-up
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_cache_chunk: Optional[int] = None  # None: no gradient caching
    checkpoint_every: int = 100  # steps between checkpoints (and the last step)
    keep_best: int = 2  # checkpoints kept, ranked by loss_avg (mean training loss since the previous one) + the latest
    seed: int = 0  # model initialisation and batch order
    init_checkpoint: str = ""  # start from a checkpoint's weights (a directory, or `gallery`); "": random
    log_every: int = 10  # steps between progress lines and metrics.jsonl records


@dataclass
class RaySection:
    address: Optional[str] = None  # None: in-process Ray; "auto" or "host:port" joins a cluster
    num_workers: int = 2  # training workers (DDP ranks) and backfill actors
    use_gpu: bool = False  # one GPU per worker, NCCL and bf16 autocast
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # CPUs = torch threads
    max_failures: int = 2  # restarts of a failed training run from its last checkpoint
    # Ray's session files and sockets (local Ray only); None: a short dir under the system temp dir, never
    # inside run.root, so a full run disk cannot take Ray down. At most RAY_TEMP_DIR_MAX_LEN characters.
    temp_dir: Optional[str] = None


@dataclass
class StorageSection:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (SeaweedFS, MinIO); None: AWS_ENDPOINT_URL
    retry_seconds: float = 120.0  # how long storage I/O retries through an outage (lost connections, 5xx)


@dataclass
class TransformationSection:
    """FCT / FastFill (METHODS 6.1): a small h from the gallery model's (and side-info) embeddings to the new
    model's, so the gallery follows a new model without reading an image; off when absent."""
    branch_width: int = 256  # each input branch (old embedding, side-info); FCT: 256
    trunk_width: int = 1024  # the trunk after the branches are joined; FCT: 2048 (for 128-d embeddings)
    uncertainty: bool = True  # FastFill: h also predicts a log-variance per item (the partial backfill's order)
    steps: int = 2000  # optimiser steps over batches of cached embeddings
    batch_size: int = 512  # global batch (split over ray.num_workers)
    lr: float = 5e-4  # Adam, cosine schedule (FCT)
    lambda_c: float = 1.0  # weight of FastFill's point-to-cluster term (against the new model's class prototypes)
    tau_c: float = 0.05  # its temperature
    checkpoint_every: int = 500  # steps between h's checkpoints (a killed training resumes from the last)


@dataclass
class BackfillSection:
    gallery: Optional[str] = None  # the gallery's name; None: the dataset's name
    split: str = "gallery"  # the dataset split that is the gallery
    dtype: Literal["float32", "float16"] = "float32"  # of the stored embeddings
    batch_size: int = 256  # images per forward pass when embedding the gallery
    index: str = "Flat"  # FAISS index_factory string: Flat (exact), IVF<n>,Flat or HNSW<M> for large galleries
    transformation: Optional[TransformationSection] = None  # FCT: the gate may serve a transformed gallery
    # side-information for h: a checkpoint directory of a small model (e.g. trained self-supervised), embedded
    # and stored beside every gallery embedding by a backfill; None: h sees the old embedding only
    side_info: Optional[str] = None
    # after a transformation, the share of the gallery re-embedded with the new model (FastFill); 0: none, 1: all
    # (the gallery is then the new model's)
    budget: float = 0.0
    order: Literal["uncertainty", "random"] = "uncertainty"  # re-embed h's most uncertain items first, or at random
    step_fraction: float = 0.1  # share of the gallery re-embedded between two index swaps


@dataclass
class GateSection:
    """METHODS 6: is a new model worth serving (above the raw-pixel floor, better than what is served), and
    may it query the old gallery's index without a backfill."""
    metric: Literal["recall_at_1", "map_at_r"] = "recall_at_1"  # the M of the criterion, the gain and the floor
    max_nfr: float = 0.02  # negative flip rate of new queries against the old gallery
    min_gain: float = 0.0  # metric(new, old) - metric(old, old)
    min_improvement: float = 0.0  # each setting served must beat what is served today by this much, else rejected


@dataclass
class RunItem:
    """One run of a story (`runs`): `dml run` trains it as `run.name=<name>` with its `set` overrides."""
    name: str = ""
    set: dict[str, Any] = field(default_factory=dict)  # dotted keys, as `--set`: {train.steps: 50}


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    ray: RaySection = field(default_factory=RaySection)
    storage: StorageSection = field(default_factory=StorageSection)
    backfill: BackfillSection = field(default_factory=BackfillSection)
    gate: GateSection = field(default_factory=GateSection)
    runs: list[RunItem] = field(default_factory=list)  # a story of runs for `dml run`; other commands ignore it

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
        raw = yaml12.load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:  # empty, only comments, or `null`: every default, which is never what was meant
        raise ConfigError(f"{path}: the config file is empty; give at least run.name and run.root")
    if overrides:
        raw = _deep_merge(raw, overrides)
    return config_from_dict(raw, source=str(path))


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict:
    """`["train.steps=50", "loss.tcm={m_pos: 0.8}"]` -> a nested dict for `load_config`; each value is read as
    YAML (1.2 numbers), so `--set ray.address=null` and `--set loss.bct.lambda_bct=1e-1` mean what they say."""
    out: dict = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.steps=50")
        try:
            value = yaml12.load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from e
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} was already set to a value, not a section")
        node[parts[-1]] = value
    return out


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a `Config` from plain data (a parsed YAML file or `Config.to_dict()`)."""
    from dml_core.config_checks import validate  # the checks import the sections defined here

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
    if cfg.loss.bct is not None and cfg.loss.bct.old_checkpoint != FROM_GALLERY:
        cfg.loss.bct.old_checkpoint = absolute(cfg.loss.bct.old_checkpoint)
    if cfg.train.init_checkpoint not in ("", FROM_GALLERY):
        cfg.train.init_checkpoint = absolute(cfg.train.init_checkpoint)


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
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{name}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
        return float(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{source}: {name} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def run_overrides(item: RunItem, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `--set` items of one story run: `run.name=<name>`, then its `set`, then `overrides` (these win)."""
    import json

    return [f"run.name={item.name}", *(f"{k}={json.dumps(v)}" for k, v in item.set.items()), *overrides]


def load_story(path: str, sets: list[str] | tuple[str, ...] = ()) -> list[tuple[str, list[str], Config]]:
    """(name, `--set` items, config) of each run of the config's `runs` story (one run, the config itself,
    without `runs`); every run is loaded and checked before any starts, its errors naming `runs[i]`."""
    cfg = load_config(path, parse_overrides(sets))
    if not cfg.runs:
        return [(cfg.run.name, list(sets), cfg)]
    story = []
    for i, item in enumerate(cfg.runs):
        items = run_overrides(item, sets)
        try:
            story.append((item.name, items, load_config(path, parse_overrides(items))))
        except ConfigError as e:
            raise ConfigError(f"runs[{i}] ({item.name}): {e}") from e
    return story

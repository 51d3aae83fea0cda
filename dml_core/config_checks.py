"""Config checks that types alone cannot express (ranges, known names, sections that need each other),
run by `dml_core.config.config_from_dict` on every config it builds; each error names the field."""
from __future__ import annotations

import dataclasses

from dml_core.config import BASE_LOSSES, OBJECTIVES, PROXY_LOSSES, RAY_TEMP_DIR_MAX_LEN, Config, ConfigError, RunItem
from dml_core.data.layout import SPLITS
def validate(cfg: Config, source: str = "config") -> None:
    """Value checks that types alone cannot express; raises `ConfigError` naming the field."""
    def bad(name: str, msg: str) -> None:
        raise ConfigError(f"{source}: {name} {msg}")

    def positive(name: str, v) -> None:
        if v is not None and v <= 0:
            bad(name, f"must be > 0, got {v}")

    if not cfg.run.name or "/" in cfg.run.name:
        bad("run.name", f"must be a non-empty name without '/', got {cfg.run.name!r}")
    if not cfg.run.lease_seconds >= 1:
        bad("run.lease_seconds", f"must be >= 1 (the heartbeat runs every third of it), got {cfg.run.lease_seconds}")
    if cfg.loss.base not in BASE_LOSSES:
        bad("loss.base", f"is unknown: {cfg.loss.base!r}; known: {', '.join(BASE_LOSSES)}")
    if cfg.loss.objective not in OBJECTIVES:
        bad("loss.objective", f"is unknown: {cfg.loss.objective!r}; known: {', '.join(OBJECTIVES)}")
    _check_backbone(cfg.model.backbone, bad)
    for name in ("data.batch_size", "data.p", "data.k", "data.eval_batch_size", "model.embedding_dim",
                 "model.image_size", "model.in_channels", "loss.tau", "loss.tile_size", "loss.tiled_above",
                 "loss.gamma_shape", "train.steps", "train.lr", "train.grad_cache_chunk",
                 "train.checkpoint_every", "train.keep_best", "train.log_every", "ray.num_workers",
                 "backfill.batch_size"):
        section, key = name.split(".")
        positive(name, getattr(getattr(cfg, section), key))
    if not 0 < cfg.loss.gamma <= 1:
        bad("loss.gamma", f"must be in (0, 1], got {cfg.loss.gamma}")
    for name, v in (("data.loader_workers", cfg.data.loader_workers), ("train.warmup_steps", cfg.train.warmup_steps),
                    ("train.weight_decay", cfg.train.weight_decay), ("ray.max_failures", cfg.ray.max_failures)):
        if v < 0:
            bad(name, f"must be >= 0, got {v}")
    if cfg.data.train_classes is not None and cfg.data.train_classes < 2:
        bad("data.train_classes", f"must be >= 2 (or null: all classes), got {cfg.data.train_classes}")
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
    if cfg.loss.base in PROXY_LOSSES:
        _check_proxy_loss(cfg, bad)
    if cfg.loss.tcm is not None:
        from dml_core.losses import tcm

        _term_check("loss.tcm", lambda: tcm.check_params(**dataclasses.asdict(cfg.loss.tcm)), bad)
    if cfg.loss.bct is not None:
        from dml_core.losses import bct

        if not cfg.loss.bct.old_checkpoint:
            bad("loss.bct.old_checkpoint", "must name the old model's checkpoint directory")
        _term_check("loss.bct", lambda: bct.check_params(cfg.loss.bct.lambda_bct, cfg.loss.bct.tau_bct), bad)
    if cfg.loss.pc is not None:
        _check_pc(cfg, bad)
    if cfg.train.grad_cache_chunk is not None and cfg.train.grad_cache_chunk > cfg.data.batch_size:
        bad("train.grad_cache_chunk", "must not exceed data.batch_size")
    _check_norm(cfg, bad)
    _check_data_source(cfg, bad)
    if cfg.backfill.split not in SPLITS:
        bad("backfill.split", f"must be one of {', '.join(SPLITS)}, got {cfg.backfill.split!r}")
    _check_backfill(cfg, bad, positive)
    if cfg.storage.retry_seconds < 0:
        bad("storage.retry_seconds", f"must be >= 0, got {cfg.storage.retry_seconds}")
    if cfg.ray.temp_dir is not None and not (cfg.ray.temp_dir.startswith("/")
                                             and len(cfg.ray.temp_dir) <= RAY_TEMP_DIR_MAX_LEN):
        bad("ray.temp_dir", f"must be an absolute local path of at most {RAY_TEMP_DIR_MAX_LEN} characters (Ray's "
                            f"socket paths), got {cfg.ray.temp_dir!r}")
    for res, amount in cfg.ray.resources_per_worker.items():
        if amount < 0:
            bad(f"ray.resources_per_worker.{res}", f"must be >= 0, got {amount}")
    _check_runs(cfg.runs, bad)


def _check_backfill(cfg: Config, bad, positive) -> None:
    """The transformation's sizes and rates, the partial backfill's budget and step."""
    bf = cfg.backfill
    if not 0 <= bf.budget <= 1:
        bad("backfill.budget", f"must be a share of the gallery in [0, 1], got {bf.budget}")
    if not 0 < bf.step_fraction <= 1:
        bad("backfill.step_fraction", f"must be in (0, 1], got {bf.step_fraction}")
    t = bf.transformation
    if t is not None:
        for key in ("branch_width", "trunk_width", "steps", "batch_size", "lr", "tau_c", "checkpoint_every"):
            positive(f"backfill.transformation.{key}", getattr(t, key))
        if t.lambda_c < 0:
            bad("backfill.transformation.lambda_c", f"must be >= 0, got {t.lambda_c}")
        if t.batch_size < 2 * cfg.ray.num_workers:
            bad("backfill.transformation.batch_size", f"must give each of the ray.num_workers={cfg.ray.num_workers} "
                                                      f"workers at least 2 items (BatchNorm), got {t.batch_size}")


def _check_runs(runs: list[RunItem], bad) -> None:
    """Each story run has a distinct usable name and dotted override keys (checked whole by `run_overrides`)."""
    seen = set()
    for i, item in enumerate(runs):
        if not item.name or "/" in item.name:
            bad(f"runs[{i}].name", f"must be a non-empty name without '/', got {item.name!r}")
        if item.name in seen:
            bad(f"runs[{i}].name", f"repeats {item.name!r}: each run of the story needs its own name")
        seen.add(item.name)
        for key in item.set:
            if not all(key.split(".")):
                bad(f"runs[{i}].set", f"key {key!r} must be a dotted config key, e.g. train.steps")


def _check_pc(cfg: Config, bad) -> None:
    """PC distils loss.bct's old model through its prototypes, so it needs that section."""
    from dml_core.losses import pc

    if cfg.loss.bct is None:
        bad("loss.pc", "needs an old model: set loss.bct.old_checkpoint (PC distils the old model through "
                       "BCT's class prototypes; loss.bct.lambda_bct: 0 trains with PC alone)")
    p = cfg.loss.pc
    _term_check("loss.pc", lambda: pc.check_params(p.lambda_pc, p.alpha, p.beta, p.tau_pc), bad)
    if p.old_embeddings == "precomputed" and cfg.data.augment:
        bad("loss.pc.old_embeddings", "precomputed embeds the un-augmented images, but data.augment is on: "
                                      "set on_the_fly (or auto)")


def _check_proxy_loss(cfg: Config, bad) -> None:
    """The proxy-based base losses (METHODS.md 2.1): one proxy per class, so class labels; their parameters."""
    from dml_core.losses import arcface, proxy_anchor

    lc = cfg.loss
    if lc.objective != "supervised":
        bad("loss.base", f"{lc.base} needs loss.objective: supervised (one proxy per class label), "
                         f"got {lc.objective!r}")
    if lc.proxy_lr_mult < 0:
        bad("loss.proxy_lr_mult", f"must be >= 0 (0: fixed proxies), got {lc.proxy_lr_mult}")
    if lc.base == "proxy_anchor":  # one parameter per call, so that the error names its field
        _term_check("loss.alpha", lambda: proxy_anchor.check_params(lc.alpha, 0.0), bad)
        _term_check("loss.delta", lambda: proxy_anchor.check_params(1.0, lc.delta), bad)
        return
    angular, owner = lc.base == "arcface", {"arcface": "ArcFace", "cosface": "CosFace"}[lc.base]
    _term_check("loss.s", lambda: arcface.check_params(lc.s, 0.0, angular, owner), bad)
    if lc.m is not None:  # None: the loss's own default
        _term_check("loss.m", lambda: arcface.check_params(1.0, lc.m, angular, owner), bad)


def _check_data_source(cfg: Config, bad) -> None:
    """`data.source` names a known source kind with its options; `data.sharding` fractions and sizes."""
    from dml_core.data.sources.from_config import check_source

    try:
        check_source(cfg.data.source)
    except ValueError as e:
        name, _, msg = str(e).partition(" ")
        bad(name, msg)
    sh = cfg.data.sharding
    if not 0 <= sh.eval_class_fraction <= 1:
        bad("data.sharding.eval_class_fraction", f"must be in [0, 1], got {sh.eval_class_fraction}")
    if not 0 < sh.gallery_fraction < 1:
        bad("data.sharding.gallery_fraction", f"must be in (0, 1), got {sh.gallery_fraction}")
    if sh.max_shard_samples <= 0:
        bad("data.sharding.max_shard_samples", f"must be > 0, got {sh.max_shard_samples}")


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

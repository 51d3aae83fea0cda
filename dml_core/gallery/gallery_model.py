"""The registry's gallery model of a run's gallery: the old model for the gate, for BCT when the config says
`loss.bct.old_checkpoint: gallery`, and the starting weights with `train.init_checkpoint: gallery` (both
resolved here, before training, to that model's checkpoint)."""
from __future__ import annotations

import copy

from dml_core.config import FROM_GALLERY, Config, ConfigError
from dml_core.gallery.registry import ModelRef, Registry


def gallery_name(cfg: Config) -> str:
    """`backfill.gallery`, else the dataset's name (as `tasks.update.run_update` names it)."""
    return cfg.backfill.gallery or cfg.data.dataset


def current_gallery_model(cfg: Config) -> ModelRef | None:
    """The model that embedded the gallery's registered index, or None before the gallery's first model."""
    return current_serving(cfg)[0]


def current_serving(cfg: Config) -> tuple[ModelRef | None, ModelRef | None]:
    """(gallery model, query model) of the gallery's registry entry; (None, None) before its first model."""
    entry = Registry(cfg.run.root).gallery(gallery_name(cfg))
    return (None, None) if entry is None else (entry.gallery_model, entry.query_model)


def resolve_gallery_checkpoints(cfg: Config) -> Config:
    """A copy of `cfg` with `gallery` in `loss.bct.old_checkpoint` or `train.init_checkpoint` replaced by the
    gallery model's checkpoint; `cfg` itself when neither says `gallery`. Raises ConfigError naming the field
    when the registry has no gallery model yet."""
    wanted = {"loss.bct.old_checkpoint": cfg.loss.bct is not None and cfg.loss.bct.old_checkpoint == FROM_GALLERY,
              "train.init_checkpoint": cfg.train.init_checkpoint == FROM_GALLERY}
    fields = [f for f, on in wanted.items() if on]
    if not fields:
        return cfg
    model = current_gallery_model(cfg)
    if model is None:
        raise ConfigError(f"{fields[0]}: {FROM_GALLERY} needs a gallery model, but the registry "
                          f"{Registry(cfg.run.root).url} has none for gallery {gallery_name(cfg)!r}; train the "
                          f"first model without it")
    out = copy.deepcopy(cfg)
    if wanted["loss.bct.old_checkpoint"]:
        out.loss.bct.old_checkpoint = model.checkpoint
    if wanted["train.init_checkpoint"]:
        out.train.init_checkpoint = model.checkpoint
    return out

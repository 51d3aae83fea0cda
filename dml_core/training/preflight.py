"""The checks a run makes against its data and storage before any compute, in one place: storage
writable, dataset present, its training split fit for the config, the BCT old model compatible. Config-only
checks happen earlier, at load (`dml_core.config`). Every failure is a `ConfigError` naming the field."""
from __future__ import annotations

import uuid

from dml_core import storage
from dml_core.config import Config, ConfigError
from dml_core.data.manifest import Manifest, ManifestError


def check_storage(url: str) -> None:
    """Write, read back and delete a probe object under `url`; raise naming the URL if that fails."""
    probe = storage.join(url, f".probe-{uuid.uuid4().hex}")
    try:
        storage.write_bytes_atomic(probe, b"ok")
        if storage.read_bytes(probe) != b"ok":
            raise OSError("probe read back different bytes")
        fs, path = storage.filesystem(probe)
        fs.rm(path)
    except Exception as e:  # any client/network/permission error
        raise ConfigError(f"run.root: storage {url} is not writable or unreachable: "
                          f"{type(e).__name__}: {e}") from e


def read_dataset(cfg: Config) -> Manifest:
    """The run's dataset manifest (the newest version when `data.version` is null)."""
    try:
        return Manifest.read(cfg.data_root, cfg.data.dataset, cfg.data.version)
    except ManifestError as e:
        raise ConfigError(f"data: {e} (shard the dataset first, or fix data.dataset / data.version / "
                          f"data.root)") from e


def check_data(cfg: Config, manifest: Manifest) -> None:
    """Everything the config asks of the dataset, checked against its manifest."""
    train = manifest.split("train")
    if not train.count:
        raise ConfigError(f"data: dataset {manifest.url} has no training samples")
    if cfg.loss.objective == "supervised":
        usable = train.classes_with_at_least(2)
        if cfg.data.p > usable:
            raise ConfigError(f"data.p={cfg.data.p} classes per batch, but the training split of {manifest.url} "
                              f"has only {usable} classes with at least 2 samples")
    if cfg.loss.bct is not None:
        check_bct(cfg, manifest)


def check_bct(cfg: Config, manifest: Manifest) -> None:
    """BCT needs one old prototype per training label and an old model of the new model's dimension."""
    from dml_core.training.embed import read_model_spec

    missing = manifest.split("train").missing_labels
    if missing:
        raise ConfigError(f"loss.bct: the training labels of {manifest.url} are not contiguous from 0 (missing "
                          f"{missing[:10]}); BCT needs one old prototype per training class")
    try:
        old_dim = int(read_model_spec(cfg.loss.bct.old_checkpoint)["embedding_dim"])
    except FileNotFoundError as e:
        raise ConfigError(f"loss.bct.old_checkpoint: {e}") from e
    if old_dim != cfg.model.embedding_dim:
        raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim} differs from the BCT old model's "
                          f"embedding dim {old_dim} ({cfg.loss.bct.old_checkpoint}); BCT needs equal dims")


def preflight(cfg: Config) -> Manifest:
    """All checks before compute; returns the dataset manifest the run trains on."""
    check_storage(cfg.run_dir)
    manifest = read_dataset(cfg)
    check_data(cfg, manifest)
    return manifest

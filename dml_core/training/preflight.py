"""The checks a run makes against its data and storage before any compute, in one place: storage
writable, dataset present, its shards of their manifest sizes, its training split fit for the config, the
BCT old model and the starting weights compatible, a resumed run's saved config compatible
(`resume_config.py`). Config-only checks happen earlier, at load (`dml_core.config`). Every failure is a
`ConfigError` naming the field."""
from __future__ import annotations

import uuid

from dml_core import storage
from dml_core.config import Config, ConfigError
from dml_core.data.manifest import Manifest, ManifestError
from dml_core.data.train_reader import first_classes
from dml_core.training.resume_config import check_resume_config


def check_storage(url: str) -> None:
    """Write, read back and delete a probe object under `url`; raise naming the URL if that fails. Not
    retried: at the start a wrong endpoint is likelier than an outage, and the user is waiting."""
    probe = storage.join(url, f".probe-{uuid.uuid4().hex}")
    try:
        with storage.retry_window(0):
            storage.write_bytes_atomic(probe, b"ok")
            if storage.read_bytes(probe) != b"ok":
                raise OSError("probe read back different bytes")
            storage.remove(probe)
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
    try:
        labels = first_classes(train, cfg.data.train_classes)
    except ValueError as e:
        raise ConfigError(f"{e} (the training split of {manifest.url})") from e
    if cfg.loss.objective == "supervised":
        usable = sum(1 for c in labels if train.classes[c] >= 2)
        among = "" if cfg.data.train_classes is None else f" among its first {len(labels)} (data.train_classes)"
        if cfg.data.p > usable:
            raise ConfigError(f"data.p={cfg.data.p} classes per batch, but the training split of {manifest.url} "
                              f"has only {usable} classes with at least 2 samples{among}")
    if cfg.loss.bct is not None:
        check_bct(cfg, manifest)


def check_shards(cfg: Config, manifest: Manifest, show: int = 10) -> list[str]:
    """Every shard of the dataset has its manifest size (one listing): a truncated or appended-to shard
    stops the run here, before any worker starts, naming the bad shards; with `data.on_error: skip` they
    are only named (the readers skip them). Returns the messages."""
    from dml_core.data.shard_check import size_mismatches

    bad = size_mismatches(manifest)
    if not bad:
        return bad
    more = f"; and {len(bad) - show} more" if len(bad) > show else ""
    listed = "; ".join(bad[:show]) + more
    if cfg.data.on_error == "raise":
        raise ConfigError(f"data: {len(bad)} shard(s) of {manifest.url} do not match the manifest: {listed} "
                          f"(re-shard the dataset, or set data.on_error: skip to train without them)")
    print(f"[train] data.on_error=skip: {len(bad)} shard(s) do not match the manifest and will be skipped "
          f"when read: {listed}", flush=True)
    return bad


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
        terms = "BCT and PC need" if cfg.loss.pc is not None else "BCT needs"
        raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim} differs from the BCT old model's "
                          f"embedding dim {old_dim} ({cfg.loss.bct.old_checkpoint}); {terms} equal dims")
    if cfg.loss.pc is not None:
        check_pc_inputs(cfg)


def check_init_checkpoint(cfg: Config) -> None:
    """`train.init_checkpoint` must hold this config's model (the same backbone, options and sizes)."""
    from dml_core.training.build import build_model_from_config
    from dml_core.training.embed import read_model_spec

    try:
        spec = read_model_spec(cfg.train.init_checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_checkpoint: {e}") from e
    ours = build_model_from_config(cfg).spec
    differ = [f"{k} {spec.get(k)!r} (model: {ours.get(k)!r})" for k in sorted(set(spec) | set(ours))
              if spec.get(k) != ours.get(k)]
    if differ:
        raise ConfigError(f"train.init_checkpoint {cfg.train.init_checkpoint} holds another model: "
                          f"{', '.join(differ)}; start from a checkpoint of this config's model")


def check_pc_inputs(cfg: Config) -> None:
    """PC on the fly feeds the training images to the old model: it must take the new model's input size."""
    from dml_core.training.embed import read_model_spec
    from dml_core.training.pc import pc_mode

    if pc_mode(cfg) != "on_the_fly":
        return
    spec = read_model_spec(cfg.loss.bct.old_checkpoint)
    for key in ("image_size", "in_channels"):
        old, new = spec.get(key), getattr(cfg.model, key)
        if old is not None and int(old) != new:
            raise ConfigError(f"loss.pc.old_embeddings=on_the_fly (resolved from {cfg.loss.pc.old_embeddings}) "
                              f"runs the old model on the training images, but its {key} is {old} and "
                              f"model.{key} is {new}; use old_embeddings: precomputed (each model embeds "
                              f"at its own size) or an old model of the same input")


def preflight(cfg: Config) -> Manifest:
    """All checks before compute; returns the dataset manifest the run trains on."""
    check_storage(cfg.run_dir)
    check_resume_config(cfg)
    if cfg.train.init_checkpoint:
        check_init_checkpoint(cfg)
    manifest = read_dataset(cfg)
    check_data(cfg, manifest)
    check_shards(cfg, manifest)
    return manifest

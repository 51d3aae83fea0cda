"""Checks run on the driver before any training worker starts: storage reachable, dataset present,
BCT old model compatible. Each failure is a clear error naming the config field or the URL."""
from __future__ import annotations

import tarfile
import uuid
from dataclasses import asdict, dataclass

from dml_core.config import Config, ConfigError
from dml_core.data import storage


@dataclass
class DataInfo:
    """What the workers need to know about the dataset, resolved once on the driver."""

    root: str
    name: str
    version: str
    num_classes: int
    train_count: int
    num_samples: int  # 1 + the largest training sample id (size of the decomposable state)
    num_train_labels: int  # 1 + the largest training label (rows of the BCT prototype matrix)

    def to_dict(self) -> dict:
        return asdict(self)


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.run.root, "runs", cfg.run.name)


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


def data_info(cfg: Config) -> DataInfo:
    """Read the dataset manifest (the latest version when `data.version` is null)."""
    from dml_core.data.manifest import ManifestError, dataset_url, read_manifest

    try:
        manifest = read_manifest(cfg.data_root, cfg.data.dataset, cfg.data.version)
    except ManifestError as e:
        raise ConfigError(f"data: {e} (shard the dataset first, or fix data.dataset / data.version / "
                          f"data.root)") from e
    version = manifest["version"]
    base = dataset_url(cfg.data_root, cfg.data.dataset, version)
    train = manifest["splits"]["train"]
    if not train["count"]:
        raise ConfigError(f"data: dataset {base} has no training samples")
    n_train_classes = len(train["classes"])
    if cfg.loss.objective == "supervised" and cfg.data.p > n_train_classes:
        raise ConfigError(f"data.p={cfg.data.p} classes per batch, but the training split of {base} has only "
                          f"{n_train_classes} classes")
    if "max_id" in train:
        num_samples = int(train["max_id"]) + 1
    elif "params" in manifest:  # written by dml_core.data.sharding: ids are 0..N-1 over all splits
        num_samples = sum(int(s["count"]) for s in manifest["splits"].values())
    else:
        num_samples = _scan_max_id(base, train["shards"]) + 1
    train_labels = sorted(int(c) for c in train["classes"])
    missing = sorted(set(range(train_labels[-1] + 1)) - set(train_labels))
    if cfg.loss.bct is not None and missing:
        raise ConfigError(f"loss.bct: the training labels of {base} are not contiguous from 0 (missing "
                          f"{missing[:10]}); BCT needs one old prototype per training class")
    return DataInfo(cfg.data_root, cfg.data.dataset, version, int(manifest["num_classes"]), int(train["count"]),
                    num_samples, train_labels[-1] + 1)


def _scan_max_id(base: str, shards: list[dict]) -> int:
    """Largest sample id of the split, from tar member names `{id:012d}.ext` (no payload decoded)."""
    best = -1
    for shard in shards:
        url = storage.join(base, shard["name"])
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                if key.isdigit():
                    best = max(best, int(key))
    if best < 0:
        raise ConfigError(f"data: no sample ids found in the training shards of {base}")
    return best


def check_bct(cfg: Config) -> None:
    """The old checkpoint must exist and embed in the same dimension as the new model."""
    if cfg.loss.bct is None:
        return
    from dml_core.training.bct import old_embedding_dim

    try:
        old_dim = old_embedding_dim(cfg.loss.bct.old_checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if old_dim != cfg.model.embedding_dim:
        raise ConfigError(f"model.embedding_dim={cfg.model.embedding_dim} differs from the BCT old model's "
                          f"embedding dim {old_dim} ({cfg.loss.bct.old_checkpoint}); BCT needs equal dims")
    if cfg.loss.objective != "supervised":
        raise ConfigError("loss.bct needs loss.objective=supervised (class labels are the BCT targets)")


def preflight(cfg: Config) -> DataInfo:
    """All driver-side checks; returns the resolved dataset info."""
    check_storage(run_dir(cfg))
    info = data_info(cfg)
    check_bct(cfg)
    return info

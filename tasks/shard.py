"""The shard stage: `data.source` -> a versioned dataset under `<data root>/datasets/<data.dataset>/`.

The dataset version is a content fingerprint (the source's and `data.sharding`'s), so an unchanged source
writes nothing; `dataset_version` computes it without sharding, for caching and for resolving the version
a later stage should read.
"""
from __future__ import annotations

import copy

from dml_core import storage
from dml_core.config import Config
from dml_core.data.layout import MANIFEST_FILE, dataset_url
from dml_core.data.sharding import dataset_fingerprint, shard_dataset, sharding_params
from dml_core.data.sources.from_config import build_source


def _params(cfg: Config) -> dict:
    sh = cfg.data.sharding
    return sharding_params(sh.seed, sh.eval_class_fraction, sh.gallery_fraction,
                           max_shard_samples=sh.max_shard_samples)


def dataset_fingerprint_of(cfg: Config) -> str:
    """The fingerprint the configured source and sharding parameters shard to (reads the source's content)."""
    return dataset_fingerprint(build_source(cfg.data.source).fingerprint(), _params(cfg))


def sharded_version(cfg: Config) -> str | None:
    """The version the configured source shards to, if that dataset is on storage; else None."""
    version = dataset_fingerprint_of(cfg)[:12]
    exists = storage.exists(storage.join(dataset_url(cfg.data_root, cfg.data.dataset, version), MANIFEST_FILE))
    return version if exists else None


def with_version(cfg: Config, version: str | None = None) -> Config:
    """`cfg` reading dataset `version`; by default the configured source's, when `data.version` is null and
    that version is sharded (a later stage then reads what `dml shard` wrote, not any other version)."""
    version = version or cfg.data.version or sharded_version(cfg)
    if version is None or version == cfg.data.version:
        return cfg
    out = copy.deepcopy(cfg)
    out.data.version = version
    return out


def run_shard(cfg: Config) -> dict:
    """Shard `data.source` (idempotent): {"dataset", "version", "url", "fingerprint", "resharded"}, where
    `resharded` says whether any sample was written (False: the dataset was already there)."""
    storage.configure(cfg.storage)
    written = []
    sh = cfg.data.sharding
    manifest = shard_dataset(build_source(cfg.data.source), cfg.data_root, cfg.data.dataset, seed=sh.seed,
                             eval_class_fraction=sh.eval_class_fraction, gallery_fraction=sh.gallery_fraction,
                             max_shard_samples=sh.max_shard_samples, on_error=cfg.data.on_error,
                             progress=lambda split, done, total: written.append(1) if not written else None)
    return {"dataset": manifest.name, "version": manifest.version, "url": manifest.url,
            "fingerprint": manifest.fingerprint, "resharded": bool(written)}

"""Reading shards back without decoding a payload: checking them against their manifest entries (size,
sha256, complete samples) and scanning the sample ids in their member names. Errors name the shard."""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterable

from dml_core import storage
from dml_core.data.layout import DATA_MEMBERS, LABEL_MEMBERS
from dml_core.data.manifest import Manifest, ManifestError, ShardInfo

#: "size": every shard exists with its recorded size (no data read); "sha256": also its recorded hash
#: (one full read); "full": also a parseable tar holding the recorded number of complete samples.
VERIFY_LEVELS = ("size", "sha256", "full")


def check_level(level: str) -> None:
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level must be one of {VERIFY_LEVELS}, got {level!r}")


def verify_shards(manifest: Manifest, level: str = "size") -> None:
    """Check every shard of `manifest` at `level`; raise ManifestError naming the first bad shard."""
    check_level(level)
    bad = size_mismatches(manifest)
    if bad:
        raise ManifestError(bad[0])
    if level == "size":
        return
    fs, base = storage.filesystem(manifest.url)
    for info in manifest.splits.values():
        for shard in info.shards:
            _verify_shard(fs, f"{base}/{shard.name}", storage.join(manifest.url, shard.name), shard, level)


def size_mismatches(manifest: Manifest) -> list[str]:
    """One message per shard that is missing or not of its manifest size, from one listing of the dataset
    folder (no per-shard request: a truncated or appended-to tar changes its size)."""
    fs, base = storage.filesystem(manifest.url)
    fs.invalidate_cache()  # s3fs caches listings: see what is there now
    try:
        listing = fs.ls(base, detail=True)
    except FileNotFoundError:
        listing = []
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["size"] for entry in listing}
    bad = []
    for info in manifest.splits.values():
        for shard in info.shards:
            url, size = storage.join(manifest.url, shard.name), sizes.get(shard.name)
            if size is None:
                bad.append(f"shard {url} is missing")
            elif size != shard.bytes:
                bad.append(f"shard {url} has {size} bytes, manifest says {shard.bytes} "
                           f"({'truncated' if size < shard.bytes else 'appended to'}?)")
    return bad


def _verify_shard(fs, path: str, url: str, shard: ShardInfo, level: str) -> None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(f"shard {url} is missing") from None
    if len(data) != shard.bytes:  # replaced since the listing
        raise ManifestError(f"shard {url} has {len(data)} bytes, manifest says {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ManifestError(f"shard {url} sha256 does not match the manifest (corrupt)")
    if level == "full" and (n := count_tar_samples(data, url)) != shard.count:
        raise ManifestError(f"shard {url} holds {n} samples, manifest says {shard.count}")


def count_tar_samples(data: bytes, url: str) -> int:
    """Number of complete samples in a tar; raises ManifestError naming the shard if the tar does not
    parse or a sample lacks its data, .cls or .json member."""
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise ManifestError(f"shard {url}: unexpected non-file member {info.name!r}")
                key, _, ext = info.name.partition(".")
                members.setdefault(key, set()).add(ext)
                tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ManifestError(f"shard {url} is not a valid tar ({e})") from e
    for key, exts in members.items():
        if not (set(LABEL_MEMBERS) <= exts and exts & set(DATA_MEMBERS)):
            raise ManifestError(f"shard {url}: sample {key!r} is incomplete (members {sorted(exts)})")
    return len(members)


def scan_max_id(urls: Iterable[str]) -> int:
    """The largest sample id in the shards' member names `{id:012d}.ext` (-1 if none), streaming each tar
    without reading a payload: the id range of manifests written before it was recorded."""
    best = -1
    for url in urls:
        try:
            with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                    if key.isdigit():
                        best = max(best, int(key))
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ManifestError(f"shard {url}: cannot scan its sample ids ({e})") from e
    return best

"""The dataset manifest (see notes/SHARD_FORMAT.md): where a dataset lives, reading, writing and
checking its manifest.json, and verifying every shard against it."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

from dml_core.data import storage

SPLITS = ("train", "eval", "gallery")
SHARD_NAME = re.compile(r"^(train|eval|gallery)-\d{6}\.tar$")
REQUIRED = {"name": str, "version": str, "fingerprint": str, "source": dict, "seed": int, "num_classes": int,
            "class_names": list, "splits": dict, "skipped": dict, "created": str}


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match its shards (the message names which)."""


def dataset_url(root: str, name: str, version: str) -> str:
    return storage.join(root, "datasets", name, version)


def shard_urls(root: str, name: str, version: str, split: str, manifest: dict | None = None) -> list[str]:
    """URLs of one split's shards, in manifest order."""
    manifest = manifest or read_manifest(root, name, version)
    return [storage.join(dataset_url(root, name, version), s["name"]) for s in manifest["splits"][split]["shards"]]


def validate_manifest(m: dict, where: str = "manifest.json") -> dict:
    """Check the manifest's structure and internal consistency; return it or raise ManifestError."""
    for key, kind in REQUIRED.items():
        if not isinstance(m.get(key), kind):
            raise ManifestError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    if len(m["class_names"]) != m["num_classes"]:
        raise ManifestError(f"{where}: num_classes {m['num_classes']} != len(class_names) {len(m['class_names'])}")
    for split in SPLITS:
        s = m["splits"].get(split)
        if not isinstance(s, dict) or not {"count", "classes", "shards"} <= s.keys():
            raise ManifestError(f"{where}: splits.{split} missing or lacks count/classes/shards")
        if sum(x["count"] for x in s["shards"]) != s["count"] or sum(s["classes"].values()) != s["count"]:
            raise ManifestError(f"{where}: splits.{split} counts disagree (shards, classes, count)")
        for shard in s["shards"]:
            if not SHARD_NAME.match(shard.get("name", "")) or not shard["name"].startswith(split + "-"):
                raise ManifestError(f"{where}: splits.{split} has a bad shard name {shard.get('name')!r}")
    return m


def read_manifest(root: str, name: str, version: str | None = None) -> dict:
    """The manifest of `version`, or of the most recently created version when None."""
    if version is None:
        versions = list_versions(root, name)
        if not versions:
            raise ManifestError(f"no dataset {name!r} under {root}/datasets (no manifest.json found)")
        version = versions[-1]
    url = storage.join(dataset_url(root, name, version), "manifest.json")
    try:
        m = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise ManifestError(f"{url} not found") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{url}: unreadable ({e})") from e
    return validate_manifest(m, url)


def write_manifest(root: str, name: str, version: str, m: dict) -> None:
    validate_manifest(m)
    url = storage.join(dataset_url(root, name, version), "manifest.json")
    storage.write_bytes_atomic(url, json.dumps(m, indent=1, ensure_ascii=False).encode("utf-8"))


def list_versions(root: str, name: str) -> list[str]:
    """Versions of a dataset that have a manifest, oldest first (by their `created` time)."""
    fs, path = storage.filesystem(storage.join(root, "datasets", name))
    fs.invalidate_cache()
    found = []
    for m_path in fs.glob(f"{path}/*/manifest.json"):
        try:
            with fs.open(m_path, "rb") as f:
                found.append((json.load(f).get("created", ""), m_path.rsplit("/", 2)[-2]))
        except (OSError, ValueError):
            continue
    return [v for _, v in sorted(found)]


def verify_dataset(root: str, name: str, version: str) -> dict:
    """Check every shard: present, its size and sha256 as recorded, a parseable tar whose samples match
    the manifest's count, each with an image or .npy, a .cls and a .json. Raise ManifestError naming the
    bad shard; return the manifest when all is well."""
    m = read_manifest(root, name, version)
    base = dataset_url(root, name, version)
    for split in SPLITS:
        for shard in m["splits"][split]["shards"]:
            url = storage.join(base, shard["name"])
            try:
                data = storage.read_bytes(url)
            except FileNotFoundError:
                raise ManifestError(f"shard {url} is missing") from None
            if len(data) != shard["bytes"]:
                raise ManifestError(f"shard {url} has {len(data)} bytes, manifest says {shard['bytes']} (truncated?)")
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise ManifestError(f"shard {url} sha256 does not match the manifest (corrupt)")
            n = count_tar_samples(data, url)
            if n != shard["count"]:
                raise ManifestError(f"shard {url} holds {n} samples, manifest says {shard['count']}")
    return m


def count_tar_samples(data: bytes, url: str) -> int:
    """Number of complete WebDataset samples in a tar; raises ManifestError naming the shard if the tar
    does not parse or a sample lacks its data, .cls or .json member."""
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
        if not ({"cls", "json"} <= exts and exts & {"png", "jpg", "npy"}):
            raise ManifestError(f"shard {url}: sample {key!r} is incomplete (members {sorted(exts)})")
    return len(members)

"""Test helper: read a sharded dataset back with tarfile only (independent of the writer's code)."""
from __future__ import annotations

import io
import json
import tarfile


def read_tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} for every member of one tar."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def read_dataset(manifest, read) -> list[dict]:
    """Every sample of every split of a `Manifest` as {"key", "split", "shard", "meta", "cls", "ext", "data"}.

    `read(shard_name) -> bytes` fetches one shard (a local file, boto3, ...)."""
    out = []
    for split, info in manifest.splits.items():
        for shard in info.shards:
            for key, members in read_tar_samples(read(shard.name)).items():
                (ext,) = [e for e in members if e not in ("cls", "json")]
                out.append({"key": key, "split": split, "shard": shard.name, "ext": ext,
                            "meta": json.loads(members["json"]), "cls": int(members["cls"]), "data": members[ext]})
    return out

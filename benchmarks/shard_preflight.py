"""Pre-flight shard check cost: comparing every shard's size with the manifest, on SeaweedFS S3 (loopback)
and on local disk, by one listing of the dataset folder (what the pre-flight does) vs one HEAD per shard.

    python benchmarks/shard_preflight.py [--shards 1000] [--repeats 5]

Writes benchmarks/results/shard_preflight.json and .md. The shards are small objects of random bytes
(the check reads no shard data, so their content and size do not matter); times are the median of
`--repeats` runs, each with s3fs's listing cache dropped, so every run asks the server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core import storage  # noqa: E402
from dml_core.data.manifest import Manifest, ShardInfo, SplitInfo  # noqa: E402
from dml_core.data.shard_check import size_mismatches  # noqa: E402
from infra.seaweedfs import SeaweedS3  # noqa: E402


def make_dataset(root: str, n: int, size: int) -> Manifest:
    """`n` training shards of `size` random bytes and their manifest under `root`."""
    url = storage.join(root, "datasets", "bench", "000000000000")
    fs, base = storage.filesystem(url)
    names = [f"train-{i:06d}.tar" for i in range(n)]
    fs.makedirs(base, exist_ok=True)  # a no-op on S3
    fs.pipe({f"{base}/{name}": os.urandom(size) for name in names})
    shards = [ShardInfo(name, 1, size, "0" * 64) for name in names]
    empty = SplitInfo(0, {}, [])
    m = Manifest(name="bench", version="000000000000", fingerprint="0" * 64, num_classes=1, class_names=["c"],
                 splits={"train": SplitInfo(n, {0: n}, shards), "eval": empty, "gallery": empty}, skipped=[],
                 created="2026-01-01T00:00:00Z", source={"kind": "synthetic"}, seed=0, url=url)
    m.write()
    return m


def per_shard_heads(m: Manifest) -> list[str]:
    """The naive way, for comparison: one HEAD (`info`) per shard, one after another."""
    fs, base = storage.filesystem(m.url)
    fs.invalidate_cache()
    return [s.name for s in m.split("train").shards if fs.info(f"{base}/{s.name}")["size"] != s.bytes]


def timed(fn, m: Manifest, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bad = fn(m)
        times.append(time.perf_counter() - t0)
        assert not bad, bad[:3]
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "repeats": repeats}


def bench(root: str, args) -> dict:
    m = make_dataset(root, args.shards, args.shard_bytes)
    out = {"listing": timed(size_mismatches, m, args.repeats),
           "head_per_shard": timed(per_shard_heads, m, max(1, args.repeats // 2))}
    first = m.split("train").shards[0]
    fs, base = storage.filesystem(m.url)
    fs.pipe_file(f"{base}/{first.name}", os.urandom(first.bytes // 2))  # the check must see a truncated shard
    bad = size_mismatches(m)
    assert len(bad) == 1 and first.name in bad[0], bad
    return out


def write_markdown(path: str, payload: dict) -> None:
    lines = ["# Pre-flight shard size check", "", f"Command: `{payload['command']}`", "",
             f"Machine: {payload['machine']['cpus']} CPUs ({payload['machine']['platform']}); load average "
             f"(1 min) at start {payload['load_avg_start']}, at end {payload['load_avg_end']}.", "",
             f"{payload['settings']['shards']} shards; times are medians of repeated runs (listing cache dropped "
             "each time).", "", "| store | method | median s | min s | max s | runs |", "|---|---|---:|---:|---:|---:|"]
    for store in ("s3", "local"):
        for method, r in payload.get(store, {}).items():
            lines.append(f"| {store} | {method} | {r['median_s']} | {r['min_s']} | {r['max_s']} | {r['repeats']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--shard-bytes", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/shard_preflight")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "load_avg_start": round(os.getloadavg()[0], 2),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        with SeaweedS3(bucket="bench", workdir=os.path.join(tmp, "seaweedfs")) as s3:
            os.environ.update(s3.client_env())
            payload["s3"] = bench(s3.url("preflight"), args)
        payload["local"] = bench(os.path.join(tmp, "local"), args)
    payload["load_avg_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    write_markdown(args.out + ".md", payload)
    print(json.dumps({k: payload[k] for k in ("s3", "local")}, indent=1))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()

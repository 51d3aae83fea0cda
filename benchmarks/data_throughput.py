"""Data pipeline throughput: reading shards from local disk and from SeaweedFS S3 on loopback, the training
and evaluation readers (decode included, real DataLoader worker processes), decode alone, and the
on-device two-view augmentation.

    python benchmarks/data_throughput.py [--per-class 600] [--workers 2] [--long-steps 188]

Writes benchmarks/results/data_throughput.json and .md. Figures are samples per second, one timed pass
each after a warm-up pass (so the page cache is warm for local disk; S3 goes through HTTP every time).
The short train pass (60 steps, 1,920 samples) mostly measures per-pass fixed costs (worker start-up,
first shard); the long passes (the eval reader over every shard, and the train reader for --long-steps
batches, >= 6,000 samples) measure streaming. The S3/local ratio of each reader is reported for both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core.data.augment import AugmentConfig, two_views  # noqa: E402
from dml_core.data.decode import decode_sample  # noqa: E402
from dml_core.data.eval_reader import EvalReader  # noqa: E402
from dml_core.data.layout import SPLITS  # noqa: E402
from dml_core.data.manifest import Manifest  # noqa: E402
from dml_core.data.shard_stream import iter_samples  # noqa: E402
from dml_core.data.sharding import shard_dataset  # noqa: E402
from dml_core.data.sources import SyntheticSource, fashion_mnist  # noqa: E402
from dml_core.data.sources.idx import FASHION_MNIST_DIR  # noqa: E402
from dml_core.data.train_reader import TrainReader  # noqa: E402
from infra.seaweedfs import SeaweedS3  # noqa: E402


def timed(fn):
    fn()  # warm-up
    load = os.getloadavg()[0]
    t = time.perf_counter()
    n, nbytes = fn()
    dt = time.perf_counter() - t
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
            "mb_per_s": round(nbytes / dt / 2**20, 2) if nbytes else None, "load_avg_1m_before": round(load, 2)}


def raw_read(urls):
    def run():
        n = nbytes = 0
        for s in iter_samples(urls):
            n += 1
            nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
        return n, nbytes
    return run


def eval_read(manifest, workers, endpoint):
    def run():
        reader = EvalReader.from_manifest(manifest, SPLITS, rank=0, world_size=1, batch_size=256,
                                          num_workers=workers, endpoint_url=endpoint)
        return sum(len(b) for b in reader), 0
    return run


def train_read(manifest, workers, endpoint, steps, p, k):
    def run():
        reader = TrainReader.from_manifest(manifest, rank=0, world_size=1, steps=steps, p=p, k=k,
                                           shuffle_buffer=500, num_workers=workers, endpoint_url=endpoint)
        return sum(len(b) for b in reader), 0
    return run


def decode_only(raw):
    def run():
        for s in raw:
            decode_sample(s)
        return len(raw), 0
    return run


def augment_only(images, repeats=5):
    cfg = AugmentConfig()

    def run():
        g = torch.Generator().manual_seed(0)
        for _ in range(repeats):
            two_views(images, cfg, g)
        return repeats * len(images), 0
    return run


def make_datasets(root, per_class):
    sources = {"synthetic-rgb64": SyntheticSource(num_classes=10, per_class=per_class, kind="images",
                                                  image_size=(64, 64), noise=0.1)}
    if os.path.exists(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"):
        sources["fmnist-gray28"] = fashion_mnist(subsets=("train",), max_per_class=per_class)
    out = {}
    for name, src in sources.items():
        m = shard_dataset(src, root, name, seed=0, max_shard_samples=500)
        out[name] = {"version": m.version, "count": m.count, "train_count": m.split("train").count,
                     "shards": len(m.shard_urls(SPLITS))}
    return out


SHORT_STEPS = 60  # 1,920 samples at P x K = 4 x 8


def bench_store(label, root, datasets, workers, endpoint, long_steps):
    results = {}
    for name, info in datasets.items():
        m = Manifest.read(root, name, info["version"])
        r = {"raw_read_1proc": timed(raw_read(m.shard_urls(SPLITS))),
             f"eval_reader_decode_{workers}workers": timed(eval_read(m, workers, endpoint)),
             f"train_reader_pk4x8_{workers}workers": timed(train_read(m, workers, endpoint, steps=SHORT_STEPS,
                                                                      p=4, k=8)),
             f"train_reader_pk4x8_{workers}workers_long": timed(train_read(m, workers, endpoint, steps=long_steps,
                                                                           p=4, k=8))}
        for key, v in r.items():
            print(f"{label:6s} {name:16s} {key:32s} {v['samples_per_s']:>10.1f} samples/s", flush=True)
        results[name] = r
    return results


def bench_compute(root, datasets):
    out = {}
    for name, info in datasets.items():
        raw = list(iter_samples(Manifest.read(root, name, info["version"]).shard_urls("train")))[:2000]
        batch = torch.stack([decode_sample(s).image for s in raw[:256]])
        out[name] = {"decode_1proc": timed(decode_only(raw)),
                     f"two_views_augment_batch256_{tuple(batch.shape[1:])}": timed(augment_only(batch))}
        for key, v in out[name].items():
            print(f"cpu    {name:16s} {key:32s} {v['samples_per_s']:>10.1f} samples/s", flush=True)
    return out


def s3_vs_local(payload):
    """S3 samples/s over local samples/s for every reader measurement (and the raw read)."""
    out = {}
    for name, r in payload.get("s3", {}).items():
        for key, v in r.items():
            local = payload["local"].get(name, {}).get(key)
            if local:
                out.setdefault(name, {})[key] = {
                    "samples": v["samples"], "ratio": round(v["samples_per_s"] / local["samples_per_s"], 3),
                    "long_pass": v["samples"] >= 6000}
    return out


def write_markdown(path, payload, command):
    busy = max(payload["load_avg_start"], payload["load_avg_end"]) > payload["machine"]["cpus"] / 2
    lines = ["# Data throughput", "", f"Command: `{command}`", "",
             f"Machine: {payload['machine']['cpus']} CPUs ({payload['machine']['platform']}), torch threads "
             f"{payload['machine']['torch_threads']}; load average (1 min) at start {payload['load_avg_start']}, "
             f"at end {payload['load_avg_end']}" + (" (other jobs were running)." if busy else "."), "",
             "| store | dataset | measurement | samples/s | MB/s | samples | load before |",
             "|---|---|---|---:|---:|---:|---:|"]
    for store in ("local", "s3"):
        for name, r in payload.get(store, {}).items():
            for key, v in r.items():
                lines.append(f"| {store} | {name} | {key} | {v['samples_per_s']} | {v['mb_per_s'] or ''} | "
                             f"{v['samples']} | {v['load_avg_1m_before']} |")
    for name, r in payload["compute"].items():
        for key, v in r.items():
            lines.append(f"| cpu | {name} | {key} | {v['samples_per_s']} | | {v['samples']} | "
                         f"{v['load_avg_1m_before']} |")
    if payload.get("s3_vs_local"):
        lines += ["", "S3 / local, same reader and pass length (target: >= 0.8 on the long passes, >= 6,000 samples):",
                  "", "| dataset | measurement | samples | S3 / local | long pass |", "|---|---|---:|---:|---|"]
        for name, r in payload["s3_vs_local"].items():
            for key, v in r.items():
                lines.append(f"| {name} | {key} | {v['samples']} | {v['ratio']:.2f}x | "
                             f"{'yes' if v['long_pass'] else 'no'} |")
    lines += ["", "two_views_augment counts input images per second (each gives two views), on CPU with one thread; "
              "raw_read is one process reading tar members without decoding; the readers include PNG decoding "
              "in real DataLoader worker processes and worker start-up.", "", "Datasets: " + ", ".join(f"{n} ({d['count']} samples, {d['shards']} shards)"
                                          for n, d in payload["datasets"].items()), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=600, help="items per class in each benchmark dataset")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the readers")
    ap.add_argument("--long-steps", type=int, default=188,
                    help="batches of the long train pass (188 x 32 = 6,016 samples)")
    ap.add_argument("--out", default="benchmarks/results/data_throughput")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurements")
    ap.add_argument("--no-fork-guard", action="store_true",
                    help="turn off storage's fork guard, to measure the reader stall it prevents (issue 10)")
    args = ap.parse_args(argv)
    if args.no_fork_guard:
        from dml_core import storage
        storage._fork_guard_enabled = False
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "load_avg_start": round(os.getloadavg()[0], 2),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": 1},
               "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        local_root = os.path.join(tmp, "local")
        payload["datasets"] = make_datasets(local_root, args.per_class)
        payload["local"] = bench_store("local", local_root, payload["datasets"], args.workers, None,
                                       args.long_steps)
        payload["compute"] = bench_compute(local_root, payload["datasets"])
        if not args.no_s3:
            with SeaweedS3(bucket="bench", workdir=os.path.join(tmp, "seaweedfs")) as s3:
                os.environ.update(s3.client_env())  # credentials and endpoint for s3fs here and in loader workers
                s3_root = s3.url("bench")
                make_datasets(s3_root, args.per_class)
                payload["s3"] = bench_store("s3", s3_root, payload["datasets"], args.workers, s3.endpoint_url,
                                            args.long_steps)
                payload["s3_vs_local"] = s3_vs_local(payload)
    payload["load_avg_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    write_markdown(args.out + ".md", payload, command)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()

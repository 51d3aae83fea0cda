"""Gallery backfill throughput (items/s): `tasks.backfill.run_backfill` with 1 and 2 Ray workers against a
plain single-process inference loop over the same model and Fashion-MNIST gallery shards, on local disk and
on SeaweedFS S3 on loopback, plus the Flat index build over the embedded gallery.

    python benchmarks/backfill_throughput.py [--per-class 4000 --max-shard-samples 250 --repeats 3]

Writes benchmarks/results/backfill_throughput.json and .md. The plain loop is what one actor does, without
Ray: load the checkpoint's model, then for each shard an EvalReader + embed_batches (it writes nothing; the
backfill also writes each shard's embeddings, completion record and the manifest). Each backfill embeds into
a fresh model_version (nothing reused) with Ray and its `tasks.backfill.EmbedPool` already started (as in
a flow that embedded its evaluation split with the pool first); its time includes loading the model in each
actor. "1 worker, new actors" passes no pool, so its time includes starting the actor as well. The six setups run in interleaved rounds; each figure is the median round and
each ratio the median of the rounds' ratios.
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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core import storage  # noqa: E402
from dml_core.config import config_from_dict  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETUPS = [("plain loop, 1 process", 0), ("Ray backfill, 1 worker", 1), ("Ray backfill, 2 workers", 2),
          ("Ray backfill, 1 worker, new actors", 1)]
COLD = "Ray backfill, 1 worker, new actors"  # no pool passed: the call starts its own actor
TARGETS = [  # (name, numerator setup, denominator setup, target): what issue 12 asks of this machine
    ("Ray 1 worker / plain", ("Ray backfill, 1 worker",), ("plain loop, 1 process",), 0.9),
    ("Ray 2 workers / Ray 1 worker", ("Ray backfill, 2 workers",), ("Ray backfill, 1 worker",), 1.5)]
DATASET = "fmnist-backfill-bench"


def shard(root: str, args):
    """The Fashion-MNIST dataset whose gallery split is embedded (the same on every store)."""
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import fashion_mnist

    return shard_dataset(fashion_mnist(subsets=("train",), max_per_class=args.per_class), root, DATASET, seed=0,
                         eval_class_fraction=0.5, gallery_fraction=0.5, max_shard_samples=args.max_shard_samples)


def make_config(root: str, manifest, workers: int, args):
    return config_from_dict({
        "run": {"name": "backfill-bench", "root": root},
        "data": {"dataset": manifest.name, "version": manifest.version, "batch_size": 8, "p": 4, "k": 2},
        "model": {"backbone": args.backbone, "embedding_dim": args.embedding_dim,
                  "backbone_options": {"widths": args.widths}},
        "ray": {"num_workers": max(workers, 1), "resources_per_worker": {"CPU": args.threads}},
        "backfill": {"batch_size": args.batch_size}})


def save_checkpoint(root: str, manifest, args) -> str:
    """A randomly initialised model of the config (seed 0: the same weights on every store)."""
    from dml_core.models.checkpoint import save_model
    from dml_core.training.build import build_model_from_config

    torch.manual_seed(0)
    checkpoint = storage.join(root, "runs", "backfill-bench", "checkpoints", "checkpoint_00000001")
    save_model(build_model_from_config(make_config(root, manifest, 1, args)), storage.join(checkpoint, "model.pt"))
    return checkpoint


def plain_loop(checkpoint: str, manifest, args, on_shard) -> int:
    """One process, no Ray: load the model, then read and embed shard by shard; the items embedded."""
    from dml_core.data.eval_reader import EvalReader
    from dml_core.training.embed import embed_batches, load_checkpoint_model

    torch.set_num_threads(args.threads)
    model = load_checkpoint_model(checkpoint)
    spec = getattr(model, "spec", {}) or {}
    items = 0
    for url, count in manifest.shards("gallery"):
        reader = EvalReader([url], counts=[count], rank=0, world_size=1, batch_size=args.batch_size,
                            num_workers=0, image_size=spec.get("image_size"), channels=spec.get("in_channels"))
        n = len(embed_batches(model, reader).ids)
        on_shard(0, {"count": n})
        items += n
    return items


def ray_backfill(cfg, checkpoint: str, version: str, on_shard, pool) -> tuple[int, str]:
    from tasks.backfill import run_backfill

    result = run_backfill(cfg, checkpoint, version, on_shard=on_shard, pool=pool)
    if result.embedded != result.shards:
        raise RuntimeError(f"backfill {version} embedded {result.embedded} of {result.shards} shards (reused work?)")
    return result.manifest["count"], result.url


def time_index(url: str, args) -> dict:
    """Load the embedded gallery from its store, build a Flat index over it and search it."""
    import faiss

    from dml_core.gallery.embeddings import load_gallery
    from dml_core.gallery.index import IndexSpec, build_index

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    emb = load_gallery(url)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(emb.z, emb.ids, IndexSpec(factory="Flat", device="cpu"))
    build_s = time.perf_counter() - t
    queries = emb.z[:args.queries]
    t = time.perf_counter()
    index.search(queries, 10)
    search_s = time.perf_counter() - t
    return {"vectors": len(emb.ids), "dim": int(emb.z.shape[1]), "load_gallery_s": load_s, "build_flat_s": build_s,
            "build_seconds_recorded": index.manifest.build_seconds, "queries": len(queries),
            "search_top10_s": search_s, "queries_per_s": len(queries) / search_s}


def run_rounds(stores: dict, args) -> dict:
    """Interleaved rounds of every (store, setup); items/s per round, and one Ray-embedded gallery per store."""
    from tasks.backfill import EmbedPool

    rates = {s: {label: [] for label, _ in SETUPS} for s in stores}
    steady = {s: {label: [] for label, _ in SETUPS} for s in stores}
    first = {s: {label: [] for label, _ in SETUPS} for s in stores}
    galleries = {}
    for rep in range(args.repeats):  # interleaved, so a change in machine load hits every setup alike
        for store, st in stores.items():
            for label, workers in SETUPS:
                done = []  # (time, items) of each finished shard

                def on_shard(_n, record):
                    done.append((time.perf_counter(), record["count"]))

                cfg = make_config(st["root"], st["manifest"], workers, args)
                pool = EmbedPool(cfg).start() if workers and label != COLD else None  # off the clock
                t = time.perf_counter()
                if workers == 0:
                    items = plain_loop(st["checkpoint"], st["manifest"], args, on_shard)
                else:
                    version = f"bench-{rep}-{[name for name, _ in SETUPS].index(label)}"
                    items, galleries[store] = ray_backfill(cfg, st["checkpoint"], version, on_shard, pool)
                seconds = time.perf_counter() - t
                if pool is not None:
                    pool.close()
                first[store][label].append(done[0][0] - t)
                steady[store][label].append(sum(c for _, c in done[1:]) / max(done[-1][0] - done[0][0], 1e-9))
                if items != st["gallery_count"]:
                    raise RuntimeError(f"{store} {label} embedded {items} items, the gallery has {st['gallery_count']}")
                rates[store][label].append(items / seconds)
                print(f"round {rep + 1}: {store:5s} {label}: {items / seconds:.0f} items/s ({seconds:.1f} s)",
                      flush=True)
    return {"items_per_s": rates, "steady_items_per_s": steady, "first_shard_s": first, "galleries": galleries}


def ratios(rates: dict) -> list[dict]:
    """Each target ratio per round and its median, with the target and whether the median meets it."""
    out = []
    for store, r in rates.items():
        for name, (num,), (den,), target in TARGETS:
            per_round = [a / b for a, b in zip(r[num], r[den])]
            out.append({"ratio": name, "store": store, "per_round": per_round, "target": target,
                        "median": statistics.median(per_round)})
    if "s3" in rates:
        for label, _ in SETUPS:
            per_round = [a / b for a, b in zip(rates["s3"][label], rates["local"][label])]
            out.append({"ratio": f"S3 / local, {label}", "store": "both", "per_round": per_round, "target": 0.8,
                        "median": statistics.median(per_round)})
    for r in out:
        r["met"] = r["median"] >= r["target"]
    return out


def write_markdown(path: str, payload: dict) -> None:
    m, a = payload["meta"], payload["settings"]
    lines = ["# Backfill throughput", "", f"Command: `{m['command']}`", "",
             f"{m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, {a['threads']} torch thread(s) per "
             f"worker and for the plain loop; {a['backbone']} {a['widths']}, embedding_dim {a['embedding_dim']}, "
             f"batch {a['batch_size']}; gallery of {m['gallery_count']} Fashion-MNIST images in {m['gallery_shards']} "
             f"shards; {a['repeats']} interleaved rounds, the table shows the median round (Ray started once "
             f"beforehand in {m['ray_init_s']:.1f} s; the actor pool of each Ray setup started before its clock "
             f"starts, except for \"new actors\").", "",
             f"Machine load (1/5/15-min load average) before: {m['loadavg_1_5_15_before']}, after: "
             f"{m['loadavg_1_5_15_after']} (a shared machine; the runs themselves add up to 2, plus SeaweedFS).", "",
             "| store | setup | items/s | each round | first shard done after, s | steady items/s |",
             "|---|---|---:|---|---:|---:|"]
    for store, r in payload["items_per_s"].items():
        for label, per_round in r.items():
            lines.append(f"| {store} | {label} | {statistics.median(per_round):.0f} | "
                         f"{', '.join(f'{x:.0f}' for x in per_round)} | "
                         f"{statistics.median(payload['first_shard_s'][store][label]):.1f} | "
                         f"{statistics.median(payload['steady_items_per_s'][store][label]):.0f} |")
    lines += ["", "| ratio | store | median | each round | target | |", "|---|---|---:|---|---:|---|"]
    for r in payload["ratios"]:
        lines.append(f"| {r['ratio']} | {r['store']} | {r['median']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['per_round'])} | >= {r['target']} | "
                     f"{'met' if r['met'] else 'not met'} |")
    lines += ["", "Flat index over the embedded gallery (load_gallery from the store, build_index, top-10 search; "
              "larger indexes: see the index build and search table):", "",
              "| store | vectors | dim | load gallery s | build Flat s | queries | search s | queries/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for store, ix in payload["index"].items():
        lines.append(f"| {store} | {ix['vectors']} | {ix['dim']} | {ix['load_gallery_s']:.3f} | "
                     f"{ix['build_flat_s']:.4f} | {ix['queries']} | {ix['search_top10_s']:.4f} | "
                     f"{ix['queries_per_s']:.0f} |")
    lines += ["", "items/s: gallery items over the whole call. The plain loop loads the model and embeds (reads, "
              "decodes, runs the model) and writes nothing; a backfill also starts its actors, loads the model in "
              "each and writes every shard's embeddings and completion record and the manifest to the store. "
              "First shard done after: the fixed start-up cost plus one shard. Steady items/s: the items of the "
              "shards finished after the first one over the time from the first to the last (streaming rate "
              "without start-up; the targets are judged on the whole call's items/s)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4000,
                    help="Fashion-MNIST images per class to shard (the gallery gets 2.5x this: 5 classes, half each)")
    ap.add_argument("--max-shard-samples", type=int, default=250)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--embedding-dim", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256, help="backfill.batch_size, and the plain loop's")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per worker and for the plain loop")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the six setups")
    ap.add_argument("--queries", type=int, default=1000, help="gallery rows searched in the Flat index")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurements")
    ap.add_argument("--out-json", default=os.path.join(RESULTS, "backfill_throughput.json"))
    ap.add_argument("--out-md", default=os.path.join(RESULTS, "backfill_throughput.md"))
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])])
    load_before = os.getloadavg()

    import ray

    from infra.seaweedfs import SeaweedS3
    from tasks import ray_runtime

    with tempfile.TemporaryDirectory(prefix="dml-bench-") as tmp:
        s3 = None
        if not args.no_s3:  # before Ray starts, so its workers inherit the endpoint and credentials
            s3 = SeaweedS3(bucket="bench", workdir=os.path.join(tmp, "seaweedfs")).start()
            os.environ.update(s3.client_env())
        try:
            roots = {"local": os.path.join(tmp, "local")} | ({"s3": s3.url("backfill")} if s3 else {})
            stores = {}
            for store, root in roots.items():
                t = time.perf_counter()
                manifest = shard(root, args)
                stores[store] = {"root": root, "manifest": manifest, "shard_s": time.perf_counter() - t,
                                 "checkpoint": save_checkpoint(root, manifest, args),
                                 "gallery_count": manifest.split("gallery").count}
                print(f"{store}: sharded in {stores[store]['shard_s']:.1f} s", flush=True)
            t = time.perf_counter()
            ray_runtime.init_ray(make_config(roots["local"], stores["local"]["manifest"], 1, args))
            ray_init_s = time.perf_counter() - t
            measured = run_rounds(stores, args)
            index = {store: time_index(url, args) for store, url in measured["galleries"].items()}
        finally:
            ray.shutdown()
            if s3 is not None:
                s3.stop()
    manifest = stores["local"]["manifest"]
    meta = {"command": command, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), "ray": ray.__version__, "ray_init_s": ray_init_s,
            "gallery_count": manifest.split("gallery").count, "gallery_shards": len(manifest.shards("gallery")),
            "shard_s": {s: st["shard_s"] for s, st in stores.items()},
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    payload = {"meta": meta, "settings": vars(args), "items_per_s": measured["items_per_s"],
               "steady_items_per_s": measured["steady_items_per_s"], "first_shard_s": measured["first_shard_s"],
               "ratios": ratios(measured["items_per_s"]), "index": index}
    for path in (args.out_json, args.out_md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(payload, f, indent=1)
    write_markdown(args.out_md, payload)
    print(f"wrote {args.out_json} and {args.out_md}")


if __name__ == "__main__":
    main()

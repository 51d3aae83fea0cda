"""Query service load (`dml api`: tasks/query_api.py on Ray Serve) over loopback HTTP on a 100k-item gallery,
Flat and HNSW32: queries/s and p50/p99 latency with 1, 4 and 16 concurrent clients (one image, k=10 per
request), each level bounded by a request count and a time; then a stream of requests while the registry
switches, first a backfill-free update (a new query model, same index), then a full switch (new model, new
gallery, new index): errors (target 0), answers from a pair never registered (target 0), the time from the
registry write to the first answer of the new pair, and p99 during the swap against before it. Also `dml
query` wall time and one in-process search with torch's and FAISS's default threads against one thread.

The gallery is synthetic (clustered unit vectors, eval_scale.make_data), the query models small untrained
CNNs (the demo's widths 16-32-64, 28x28 gray), the query images seeded noise. Clients are asyncio + httpx in
this process, on the same machine as Ray. Results: benchmarks/results/serve_load.{json,md}.

    python benchmarks/serve_load.py [--items 100000 --dim 64 --clients 1 4 16 --requests 1500 --seconds 15]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eval_scale import make_data
from report import report_header, save_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "serve_load"
FACTORIES = {"flat": "Flat", "hnsw": "HNSW32"}


def write_gallery(out: str, z: np.ndarray, labels: np.ndarray, version: str, shard_size: int = 10_000) -> str:
    """Gallery embeddings as a backfill writes them (an .npz, a record per shard, the manifest); its URL."""
    from dml_core import storage
    from dml_core.gallery.embeddings import MANIFEST_FILE, ShardTask, write_manifest

    tasks = []
    for i, start in enumerate(range(0, len(z), shard_size)):
        task = ShardTask(i, f"synthetic/gallery-{i:06d}.tar", min(shard_size, len(z) - start))
        buf = io.BytesIO()
        rows = slice(start, start + task.count)
        np.savez(buf, z=z[rows], ids=np.arange(len(z), dtype=np.int64)[rows], labels=labels[rows])
        data = buf.getvalue()
        storage.write_bytes_atomic(storage.join(out, task.file), data)
        record = {"index": i, "shard": task.url, "file": task.file, "count": task.count, "skipped": 0,
                  "dim": z.shape[1], "dtype": "float32", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        storage.write_bytes_atomic(storage.join(out, task.record), json.dumps(record).encode())
        tasks.append(task)
    write_manifest(out, tasks, {"gallery": "synthetic", "model_version": version})
    return storage.join(out, MANIFEST_FILE)


def build(root: str, kind: str, args) -> dict:
    """Gallery `bench-<kind>`: v1's and v3's galleries with their indexes, three query models; v1 registered.
    Returns the registry and the changes to make: the update (v2 on v1's index) and the switch (v3)."""
    import torch

    from dml_core import storage
    from dml_core.gallery.index import IndexSpec, build_index
    from dml_core.gallery.registry import ModelRef, Registry
    from dml_core.gallery.update import check_index
    from dml_core.models.checkpoint import save_model
    from dml_core.models.registry import build_model

    gallery, built = f"bench-{kind}", {}
    for n, version in enumerate(("v1", "v2", "v3")):
        torch.manual_seed(args.seed + n)
        url = storage.join(root, "runs", f"{kind}-{version}", "checkpoints", "checkpoint_00000000")
        save_model(build_model("small_cnn", embedding_dim=args.dim, widths=[16, 32, 64]), storage.join(url, "model.pt"))
        built[version] = {"model": ModelRef(version, url)}
    for n, version in enumerate(("v1", "v3")):
        z, labels = make_data(args.items, args.items // 10, args.dim, args.seed + 10 * n)
        out = storage.join(root, "galleries", gallery, version)
        t = time.perf_counter()
        index = build_index(z, spec=IndexSpec(factory=FACTORIES[kind], device="cpu", seed=args.seed))
        built[version].update(embeddings=write_gallery(out, z, labels, version), index=index.save(out),
                              build_s=time.perf_counter() - t, search_params=index.manifest.search_params)
    registry = Registry(root, check_index=check_index)
    registry.switch(gallery, built["v1"]["model"], built["v1"]["embeddings"], built["v1"]["index"], "benchmark")
    return {"gallery": gallery, "registry": registry, "built": built,
            "update": lambda: registry.set_query_model(gallery, built["v2"]["model"], "benchmark: update"),
            "switch": lambda: registry.switch(gallery, built["v3"]["model"], built["v3"]["embeddings"],
                                              built["v3"]["index"], "benchmark: full switch")}


def query_images(n: int, seed: int) -> tuple[list[str], list[bytes]]:
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return [base64.b64encode(b).decode() for b in out], out


def thread_effect(registry, gallery: str, images: list[bytes], n: int) -> dict:
    """Single-image search latency in this process with the default torch / FAISS threads, then with one."""
    import faiss
    import torch

    from dml_core.gallery.query import GalleryQuery

    query, out = GalleryQuery(registry, gallery), {}
    threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    for label, (t, f) in (("default", threads), ("one", (1, 1))):
        torch.set_num_threads(t)
        faiss.omp_set_num_threads(f)
        lat = []
        for i in range(n):
            start = time.perf_counter()
            query.search([images[i % len(images)]], 10)
            lat.append(time.perf_counter() - start)
        out[label] = {"threads": [t, f], **percentiles(lat)}
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])
    return out


def dml_query_wall(root: str, gallery: str, image: bytes, runs: int) -> list[float]:
    """Wall time of `dml query CONFIG IMAGE --k 10` (a new process each run)."""
    with tempfile.TemporaryDirectory() as tmp:
        config, path = Path(tmp) / "q.yaml", Path(tmp) / "q.png"
        config.write_text(json.dumps({"run": {"name": "bench", "root": root}, "data": {"dataset": gallery}}))
        path.write_bytes(image)
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "query", str(config), str(path),
                            "--k", "10"], check=True, capture_output=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            walls.append(time.perf_counter() - start)
    return walls


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    a = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


async def load(url: str, images: list[str], clients: int, requests: int, seconds: float, during=None) -> list:
    """`clients` concurrent clients, each POSTing one image (k=10) after its previous answer, until `requests`
    were sent or `seconds` passed; `during(t0)` runs beside them. Records (start s, latency s, ok, pair)."""
    import httpx

    records, sent, t0 = [], 0, time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() - t0 < seconds:
                sent += 1
                start, pair = time.perf_counter(), None
                try:
                    r = await client.post("/query", json={"images": [images[sent % len(images)]], "k": 10})
                    ok = r.status_code == 200
                    pair = (r.json()["query_model"], r.json()["index"]) if ok else None
                except httpx.HTTPError:
                    ok = False
                records.append((start - t0, time.perf_counter() - start, ok, pair))
        await asyncio.gather(*(one() for _ in range(clients)), *([during(t0)] if during else []))
    return records


def level(records: list, seconds: float) -> dict:
    ok = [lat for _, lat, good, _ in records if good]
    return {"requests": len(records), "errors": len(records) - len(ok), "qps": len(ok) / seconds, **percentiles(ok)}


async def swap(url: str, images: list[str], clients: int, change, registered: set, args) -> dict:
    """A stream of requests; after `args.swap_before` s the registry changes. 'during' = the requests started
    from the registry write until 1 s after the first answer from the new pair."""
    marks = {}

    async def during(t0: float) -> None:
        await asyncio.sleep(args.swap_before)
        marks["change"] = time.perf_counter() - t0
        entry = await asyncio.to_thread(change)
        marks["pair"] = (entry.query_model.version, entry.index)

    records = await load(url, images, clients, 10**9, args.swap_before + args.swap_after, during)
    new = sorted(start + lat for start, lat, ok, pair in records if ok and pair == marks["pair"])
    first_new = new[0] if new else float("inf")
    before = [lat for start, lat, ok, _ in records if ok and start < marks["change"]]
    inside = [lat for start, lat, ok, _ in records if ok and marks["change"] <= start < first_new + 1.0]
    return {"requests": len(records), "errors": sum(not ok for _, _, ok, _ in records),
            "unregistered_pairs": sum(ok and pair not in registered for _, _, ok, pair in records),
            "swap_s": first_new - marks["change"], "before": percentiles(before), "during": percentiles(inside),
            "during_requests": len(inside)}


def run(args) -> dict:
    import faiss
    import torch

    from dml_core.config import config_from_dict
    from tasks.query_api import start_api, stop_api
    from tasks.ray_runtime import init_ray, shutdown_ray

    encoded, raw = query_images(64, args.seed)
    root = tempfile.mkdtemp(prefix="dml-serve-load-")
    report = {"threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}, "indexes": {}}
    setups = {}
    for kind in args.indexes:
        setups[kind] = build(root, kind, args)
        b = setups[kind]["built"]
        report["indexes"][kind] = {"build_s": {v: round(b[v]["build_s"], 1) for v in ("v1", "v3")},
                                   "search_params": b["v1"]["search_params"],
                                   "dml_query_s": dml_query_wall(root, setups[kind]["gallery"], raw[0], args.cli_runs),
                                   "search_threads": thread_effect(setups[kind]["registry"], setups[kind]["gallery"],
                                                                   raw, args.thread_searches)}
        print(json.dumps({kind: report["indexes"][kind]}), file=sys.stderr, flush=True)
    cfg = config_from_dict({"run": {"name": "bench", "root": root}, "data": {"dataset": "x"}})
    init_ray(cfg, cfg.run_dir)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for kind, setup in setups.items():
            start_api(cfg, setup["gallery"], "127.0.0.1", args.port, poll_seconds=args.poll, replicas=args.replicas)
            asyncio.run(load(url, encoded, 4, 100, 30))  # warm-up
            out = report["indexes"][kind]
            out["levels"] = {}
            for clients in args.clients:
                start = time.perf_counter()
                records = asyncio.run(load(url, encoded, clients, args.requests, args.seconds))
                out["levels"][clients] = level(records, time.perf_counter() - start)
                print(json.dumps({kind: {clients: out["levels"][clients]}}), file=sys.stderr, flush=True)
            b = setup["built"]
            registered = {(v, b[g]["index"]) for v, g in (("v1", "v1"), ("v2", "v1"), ("v3", "v3"))}
            out["swaps"] = {name: asyncio.run(swap(url, encoded, args.swap_clients, setup[name], registered, args))
                            for name in ("update", "switch")}
            print(json.dumps({kind: out["swaps"]}), file=sys.stderr, flush=True)
    finally:
        stop_api()
        shutdown_ray()
        shutil.rmtree(root, ignore_errors=True)
    return report


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    a = report["args"]
    lines = ["# Query service load (Ray Serve, loopback HTTP)", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; load average before/after: {report['load_before']} / "
             f"{report['load_after']}", "",
             f"| index | clients | requests | errors | queries/s | p50 (ms) | p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, r in report["indexes"].items():
        for clients, x in r["levels"].items():
            lines.append(f"| {FACTORIES[kind]} | {clients} | {x['requests']} | {x['errors']} | {x['qps']:.1f} | "
                         f"{fmt(x['p50_ms'])} | {fmt(x['p99_ms'])} |")
    lines += ["", f"While the registry switches ({a['swap_clients']} clients, the change after {a['swap_before']:g} s "
              f"of a {a['swap_before'] + a['swap_after']:g} s stream; 'during' = requests started from the registry "
              "write until 1 s after the first answer from the new pair):", "",
              "| index | change | requests | errors | answers from an unregistered pair | registry write -> first new "
              "answer (s) | p99 before (ms) | p99 during (ms) | requests during |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in report["indexes"].items():
        for name, s in r["swaps"].items():
            change = "backfill-free update (new query model)" if name == "update" else "full switch (model + index)"
            lines.append(f"| {FACTORIES[kind]} | {change} | {s['requests']} | {s['errors']} | {s['unregistered_pairs']} "
                         f"| {s['swap_s']:.2f} | {fmt(s['before']['p99_ms'])} | {fmt(s['during']['p99_ms'])} | "
                         f"{s['during_requests']} |")
    lines += ["", "One search in process (one image, k=10; 28x28 small CNN + index), default threads against one:", "",
              "| index | threads (torch, FAISS) | p50 (ms) | p99 (ms) | `dml query` wall, one image (s) |",
              "|---|---|---:|---:|---|"]
    for kind, r in report["indexes"].items():
        for label, t in r["search_threads"].items():
            wall = ", ".join(f"{w:.1f}" for w in r["dml_query_s"]) if label == "one" else ""
            lines.append(f"| {FACTORIES[kind]} | {t['threads'][0]}, {t['threads'][1]} ({label}) | {t['p50_ms']:.2f} | "
                         f"{t['p99_ms']:.2f} | {wall} |")
    lines += ["", f"Gallery: {a['items']} synthetic clustered unit vectors (d={a['dim']}, ten items per class); index "
              "build (s, v1 / v3) and search params: " + "; ".join(
                  f"{FACTORIES[k]} {r['build_s']['v1']} / {r['build_s']['v3']} {r['search_params'] or ''}".rstrip()
                  for k, r in report["indexes"].items()) + ".",
              f"Service: {a['replicas']} replica (1 CPU, one torch and one FAISS thread), registry polled every "
              f"{a['poll']:g} s; each level bounded by {a['requests']} requests and {a['seconds']:g} s; clients: "
              "asyncio + httpx in the benchmark process, on the same 2 cores as Ray."]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--indexes", nargs="+", default=list(FACTORIES), choices=list(FACTORIES))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=1500, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=15.0, help="at most this long per level")
    p.add_argument("--swap-clients", type=int, default=4)
    p.add_argument("--swap-before", type=float, default=5.0)
    p.add_argument("--swap-after", type=float, default=10.0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--cli-runs", type=int, default=3)
    p.add_argument("--thread-searches", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a sentence added under the tables")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    report = report_header("serve_load.py", sys.argv[1:], args.note,
                           {k: v for k, v in vars(args).items() if k not in ("note", "out")})
    report.update(run(args))
    save_report(args.out, NAME, report, markdown)


if __name__ == "__main__":
    main()

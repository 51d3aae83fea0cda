"""Gallery index build and search on CPU: Flat, IVF and HNSW (dml_core.gallery.build_index) over clustered
embeddings (d=128, ten items per class), with recall@10 against exact search. Each gallery size runs in its
own subprocess so its peak RSS is its own; results go to benchmarks/results/index_build_search.{json,md}.

    python benchmarks/index_build_search.py [--sizes 100000 1000000 --dim 128 --queries 1000 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from eval_scale import make_data, run_child
from report import report_header, save_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "index_build_search"


def factories(n: int) -> list[str]:
    """Flat; IVF with nlist the power of two nearest 4 * sqrt(N); HNSW with M = 32."""
    nlist = 2 ** round(math.log2(4 * n ** 0.5))
    return ["Flat", f"IVF{nlist},Flat", "HNSW32"]


def child(n: int, args) -> dict:
    import faiss
    import torch

    from dml_core.gallery import IndexSpec, build_index

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    z, _ = make_data(n + args.queries, max(1, (n + args.queries) // 10), args.dim, args.seed)
    gallery, queries = z[:n], z[n:]  # held-out queries from the same clusters
    rows, exact = [], None
    for factory in factories(n):
        t = time.perf_counter()
        gi = build_index(gallery, spec=IndexSpec(factory=factory, device="cpu", seed=args.seed))
        total = time.perf_counter() - t
        t = time.perf_counter()
        found = gi.search(queries, 10).ids.numpy()  # default ids: the gallery rows
        search_s = time.perf_counter() - t
        if exact is None:  # Flat comes first: the exact neighbours of the held-out queries
            exact = found
        hits = (found[:, :, None] == exact[:, None, :]).any(axis=2).sum()
        m = gi.manifest
        rows.append({"factory": factory, "build_s": m.build_seconds, "tune_and_recall_s": total - m.build_seconds,
                     "search_s": search_s, "train_size": m.train_size, "search_params": m.search_params,
                     "recall_recorded": m.recall_at_k, "recall_held_out": float(hits / exact.size)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del gi
    return {"items": n, "rows": rows, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        "# Gallery index build and search (CPU)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}; load average before/after: {report['load_before']} / {report['load_after']}",
        "",
        f"| items | index | build (s) | tune + recall (s) | search {a['queries']} queries (s) | search params "
        "| recall@10 recorded | recall@10 held-out | peak RSS (GiB) |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for size in report["sizes"]:
        for r in size["rows"]:
            rec = "exact" if r["recall_recorded"] is None else f"{r['recall_recorded']:.4f}"
            lines.append(f"| {size['items']} | {r['factory']} | {r['build_s']:.1f} | {r['tune_and_recall_s']:.1f} | "
                         f"{r['search_s']:.2f} | {r['search_params'] or '-'} | {rec} | {r['recall_held_out']:.4f} | "
                         f"{size['peak_rss_gib']:.2f} |")
    lines += [
        "",
        f"Data: clustered embeddings (`eval_scale.make_data`, d={a['dim']}, ten items per class), L2-normalised, "
        "inner product. Build = index_factory + training (IVF: min(N, 256 * nlist) rows) + adding. Tune + recall =",
        "choosing nprobe / efSearch (smallest power of two reaching recall@10 0.96 on 1,000 gallery rows) and",
        "measuring the recorded recall on 1,000 other gallery rows, both samples held out of the index until",
        "then (dml_core/gallery/index_recall.py), against exact search.",
        f"Held-out recall: {a['queries']} queries not in the gallery, top-10 against the Flat index's top-10.",
        f"Threads: {a['threads']} (FAISS and torch). Peak RSS is the size's own subprocess (all three indexes).",
        "Wall time of each size's subprocess (data, builds, searches): "
        + ", ".join(f"{s['items']}: {s['process_wall_s']:.0f} s" for s in report["sizes"]) + ".",
    ]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a sentence added under the table")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args.child, args)))
        return
    argv = sys.argv[1:]
    report = report_header("index_build_search.py", argv, args.note,
                           {k: v for k, v in vars(args).items() if not k.startswith("child") and k not in ("note", "out")})
    report["sizes"] = [run_child(str(n), argv, __file__) for n in args.sizes]
    save_report(args.out, NAME, report, markdown)


if __name__ == "__main__":
    main()

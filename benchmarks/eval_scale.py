"""Evaluation at scale: Recall@1, MAP@R and sampled OPIS on 100,000 clustered embeddings (d=128, 10,000
classes), plus the exact OPIS path at 20,000 items. Each part runs in its own subprocess so its peak
RSS is its own; results go to benchmarks/results/eval_scale.{json,md}.

    python benchmarks/eval_scale.py [--items 100000 --classes 10000 --dim 128 --exact-items 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_data(items: int, classes: int, dim: int, seed: int):
    """Clustered embeddings: random unit centres, per-class spread drawn in [0.5, 1.5] (uneven classes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(items) % classes
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.5, size=classes).astype(np.float32) / np.sqrt(dim)
    z = centres[labels] + spread[labels, None] * rng.normal(size=(items, dim)).astype(np.float32)
    return z, labels


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(part: str, args) -> dict:
    import faiss
    import torch

    from dml_core.metrics import evaluate_retrieval, opis

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out: dict = {"part": part}
    if part == "scale":
        t = time.perf_counter()
        z, y = make_data(args.items, args.classes, args.dim, args.seed)
        out["data_s"] = time.perf_counter() - t
        t, c = time.perf_counter(), cpu_s()
        r = evaluate_retrieval(z, y, ks=(1,), backend="faiss")
        out["retrieval_s"], out["retrieval_cpu_s"] = time.perf_counter() - t, cpu_s() - c
        out.update(recall_at_1=r.recall[1], map_at_r=r.map_at_r)
        t, c = time.perf_counter(), cpu_s()
        o = opis(z, y, max_neg_per_class=args.max_neg_per_class, num_calibration_pairs=args.calibration_pairs)
        out["opis_sampled_s"], out["opis_sampled_cpu_s"] = time.perf_counter() - t, cpu_s() - c
        out.update(opis=o.opis, eps_opis=o.eps_opis, opis_neg_pairs_sampled=o.sampling["total_neg_pairs_sampled"],
                   opis_calibration_pairs=o.sampling["num_calibration_pairs"], num_pos_pairs=o.num_pos_pairs)
        out["evaluation_s"] = out["retrieval_s"] + out["opis_sampled_s"]
        out["evaluation_cpu_s"] = out["retrieval_cpu_s"] + out["opis_sampled_cpu_s"]
    else:
        z, y = make_data(args.exact_items, args.exact_items // 10, args.dim, args.seed)
        t, c = time.perf_counter(), cpu_s()
        o = opis(z, y)
        out["opis_exact_s"], out["opis_exact_cpu_s"] = time.perf_counter() - t, cpu_s() - c
        out.update(opis=o.opis, eps_opis=o.eps_opis, calibration=o.calibration["method"],
                   num_neg_pairs=o.num_neg_pairs)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


def run_child(part: str, argv: list[str], script: str = __file__) -> dict:
    """Run `script --child part` in a fresh process (its own peak memory) and return the JSON it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    wall = time.perf_counter()
    subprocess.run([sys.executable, script, "--child", part, "--child-out", path, *argv], check=True,
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = json.loads(Path(path).read_text())
    os.unlink(path)
    res["process_wall_s"] = time.perf_counter() - wall
    return res


def markdown(report: dict) -> str:
    s, e = report["scale"], report["exact"]
    a = report["args"]
    lines = [
        "# Evaluation at scale", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}; load average before/after: {report['load_before']} / {report['load_after']}",
        "",
        "| part | items | classes | wall (s) | CPU (s) | peak RSS (GiB) | result |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| Recall@1 + MAP@R (FAISS flat IP, leave-one-out) | {a['items']} | {a['classes']} | "
        f"{s['retrieval_s']:.1f} | {s['retrieval_cpu_s']:.1f} | - | R@1 {s['recall_at_1']:.4f}, MAP@R {s['map_at_r']:.4f} |",
        f"| OPIS sampled (max_neg_per_class={a['max_neg_per_class']}, {s['opis_calibration_pairs']} calibration pairs) "
        f"| {a['items']} | {a['classes']} | {s['opis_sampled_s']:.1f} | {s['opis_sampled_cpu_s']:.1f} | - | OPIS {s['opis']:.4g}, eps-OPIS {s['eps_opis']:.4g} |",
        f"| **total evaluation (target < 60 s, < 4 GiB)** | {a['items']} | {a['classes']} | **{s['evaluation_s']:.1f}** | "
        f"{s['evaluation_cpu_s']:.1f} | **{s['peak_rss_gib']:.2f}** | {'met' if s['evaluation_s'] < 60 and s['peak_rss_gib'] < 4 else 'NOT met'} |",
        f"| OPIS exact ({e['calibration']} calibration) | {a['exact_items']} | {a['exact_items'] // 10} | "
        f"{e['opis_exact_s']:.1f} | {e['opis_exact_cpu_s']:.1f} | {e['peak_rss_gib']:.2f} | OPIS {e['opis']:.4g}, eps-OPIS {e['eps_opis']:.4g} |",
        "",
        f"Synthetic data generation ({s['data_s']:.1f} s) is not counted. Threads: {a['threads']} (torch and FAISS).",
        "Peak RSS is each part's own subprocess (`getrusage(RUSAGE_SELF).ru_maxrss`), Python and torch included.",
        "CPU = user + system seconds of that subprocess; on a shared, overloaded machine the wall time exceeds",
        "CPU / threads, and CPU / threads is the better estimate of the unloaded wall time.",
    ]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--exact-items", type=int, default=20_000)
    p.add_argument("--max-neg-per-class", type=int, default=500)
    p.add_argument("--calibration-pairs", type=int, default=2_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", choices=["scale", "exact"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args.child, args)))
        return
    argv = sys.argv[1:]
    load_before = [round(x, 2) for x in os.getloadavg()]
    report = {"command": " ".join(["python", "benchmarks/eval_scale.py", *argv]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_before": load_before, "args": {k: v for k, v in vars(args).items() if not k.startswith("child")}}
    report["scale"] = run_child("scale", argv)
    report["exact"] = run_child("exact", argv)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["children_max_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_scale.json").write_text(json.dumps(report, indent=2))
    (out / "eval_scale.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

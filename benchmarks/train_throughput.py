"""Training throughput (samples/s, global) of Ray Train with 1 and 2 workers against a plain
single-process PyTorch loop, on the same model, loss and Fashion-MNIST shards, in one run.

    python benchmarks/train_throughput.py --steps 100 --batch-size 64 --k 16 --repeats 3

Writes benchmarks/results/train_throughput.json and .md. Samples/s is the median over the steps after
`--warmup` of (global batch / time between consecutive step ends), data loading included; the three
setups run in interleaved rounds and each figure is the median round.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core.config import config_from_dict  # noqa: E402
from dml_core import storage  # noqa: E402
from dml_core.training.metrics_log import read_metrics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def shard(root: str, per_class: int) -> dict:
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import fashion_mnist

    m = shard_dataset(fashion_mnist(subsets=("train",), max_per_class=per_class), root, "fmnist-bench", seed=0,
                      eval_class_fraction=0.5, gallery_fraction=0.5, max_shard_samples=500)
    return {"root": root, "name": "fmnist-bench", "version": m.version, "manifest": m}


def make_config(root: str, data: dict, name: str, workers: int, args) -> "Config":  # noqa: F821
    p = args.batch_size // args.k
    return config_from_dict({
        "run": {"name": name, "root": root},
        "data": {"dataset": data["name"], "version": data["version"], "root": data["root"],
                 "batch_size": args.batch_size, "p": p, "k": args.k},
        "model": {"backbone": args.backbone, "embedding_dim": 64, "backbone_options": {"widths": args.widths}},
        "loss": {"base": args.loss},
        "train": {"steps": args.steps, "checkpoint_every": args.steps, "log_every": args.steps, "keep_best": 1},
        "ray": {"num_workers": workers, "resources_per_worker": {"CPU": args.cpus_per_worker}},
    })


def plain_loop(cfg, data: dict, args) -> list[float]:
    """The same step function on one process, no Ray, no DDP: the baseline."""
    from dml_core.data.train_reader import TrainReader
    from dml_core.training.build import build_loss, build_model_from_config, build_optimizer, build_schedule
    from dml_core.training.step import train_step

    torch.set_num_threads(args.cpus_per_worker)
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    loss = build_loss(cfg, num_samples=data["manifest"].num_ids)
    opt = build_optimizer(cfg, model, loss)
    sched = build_schedule(cfg, opt)
    reader = TrainReader.from_manifest(data["manifest"], "train", rank=0, world_size=1, steps=args.steps,
                                       num_workers=0, p=cfg.data.p, k=cfg.data.k, image_size=28, channels=1)
    rates, t0 = [], time.perf_counter()
    for b in reader:
        train_step(model, loss, b.images, b.labels, b.ids, opt, sched)
        now = time.perf_counter()
        rates.append(len(b) / (now - t0))
        t0 = now
    return rates


def ray_run(cfg) -> list[float]:
    from tasks.train import run_training

    out = run_training(cfg)
    recs = read_metrics(storage.join(out.run_dir, "metrics.jsonl"))
    return [r["samples_per_s"] for r in recs if "samples_per_s" in r]


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64, help="per worker")
    ap.add_argument("--k", type=int, default=16, help="items per class (Fashion-MNIST has 5 training classes: p = batch / k <= 5)")
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--loss", default="info_nce")
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST images per class to shard")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three setups")
    args = ap.parse_args()

    load_before = os.getloadavg()
    runs = [("plain PyTorch, 1 process", None), ("Ray Train, 1 worker", 1), ("Ray Train, 2 workers", 2)]
    medians: dict[str, list[float]] = {label: [] for label, _ in runs}
    fast: dict[str, list[float]] = {label: [] for label, _ in runs}  # 90th percentile of the step rates
    with tempfile.TemporaryDirectory(prefix="dml-bench-") as root:
        data = shard(root, args.per_class)
        for rep in range(args.repeats):  # interleaved, so a change in machine load hits every setup alike
            for label, workers in runs:
                cfg = make_config(root, data, f"bench-{workers or 0}-{rep}", workers or 1, args)
                rates = plain_loop(cfg, data, args) if workers is None else ray_run(cfg)
                steady = rates[args.warmup:] or rates
                medians[label].append(statistics.median(steady))
                fast[label].append(statistics.quantiles(steady, n=10)[-1])
                print(f"round {rep + 1}: {label}: {medians[label][-1]:.0f} samples/s", flush=True)
            shutdown_ray()  # the plain loop of the next round runs without Ray, as a user's would
    plain = medians["plain PyTorch, 1 process"]
    results = {label: {"workers": workers or 1, "global_batch": args.batch_size * (workers or 1),
                       "samples_per_s": statistics.median(medians[label]), "per_round": medians[label],
                       "vs_plain_per_round": [m / p for m, p in zip(medians[label], plain)],
                       "fast_vs_plain_per_round": [f / p for f, p in zip(fast[label], fast[runs[0][0]])]}
               for label, workers in runs}

    meta = {"command": "python " + " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
            "batch_size_per_worker": args.batch_size, "backbone": args.backbone, "widths": args.widths,
            "loss": args.loss, "cpus_per_worker": args.cpus_per_worker, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    one, two = results["Ray Train, 1 worker"], results["Ray Train, 2 workers"]
    step_1, step_2 = (r["global_batch"] / r["samples_per_s"] for r in (one, two))
    meta["ray_1_worker_vs_plain"] = statistics.median(one["vs_plain_per_round"])
    meta["ray_1_worker_vs_plain_fast_steps"] = statistics.median(one["fast_vs_plain_per_round"])
    meta["step_s_1_worker"], meta["step_s_2_workers"] = step_1, step_2
    meta["communication_share_2_workers"] = 1 - step_1 / step_2  # same per-worker batch and compute
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "train_throughput.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["# Training throughput", "", f"Command: `{meta['command']}`", "",
             f"{meta['cpu_count']} CPUs, torch {meta['torch']}, {args.backbone} {args.widths}, {args.loss}, "
             f"{args.batch_size} images per worker per step, median over steps {args.warmup + 1}..{args.steps}; "
             f"{args.repeats} interleaved rounds, the table shows the median round.", "",
             f"Machine load (1/5/15-min load average) before: {meta['loadavg_1_5_15_before']}, after: "
             f"{meta['loadavg_1_5_15_after']} (a shared machine; the runs themselves add up to 2).", "",
             "| setup | workers | global batch | samples/s | each round | vs plain, each round |",
             "|---|---|---|---|---|---|"]
    for label, r in results.items():
        rounds = ", ".join(f"{x:.0f}" for x in r["per_round"])
        ratios = ", ".join(f"{x:.2f}" for x in r["vs_plain_per_round"])
        lines.append(f"| {label} | {r['workers']} | {r['global_batch']} | {r['samples_per_s']:.0f} | {rounds} | {ratios} |")
    lines += ["", f"Ray Train with 1 worker runs at {meta['ray_1_worker_vs_plain']:.3f}x plain PyTorch (median of the "
              f"rounds' ratios of median step rates; {meta['ray_1_worker_vs_plain_fast_steps']:.3f}x on the fast "
              f"steps, the 90th percentile of step rates, which steal time on a shared machine disturbs least). "
              f"Step time {step_1 * 1e3:.0f} ms with 1 worker and {step_2 * 1e3:.0f} ms with 2 (the same batch and "
              f"compute per worker): communication and synchronisation take "
              f"{meta['communication_share_2_workers']:.0%} of a 2-worker step (one all-gather of the batch, "
              f"its reduce-scatter in backward, TCM's and the stats' small all-reduces, DDP's gradient all-reduce)."]
    with open(os.path.join(RESULTS, "train_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

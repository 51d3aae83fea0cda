"""Training throughput (samples/s) of BCT + PC against BCT alone, with PC's old embeddings precomputed
once per run or computed by the old model on every batch, in one run on the same machine and shards.

    python benchmarks/pc_throughput.py --steps 60 --repeats 3

Each setup runs `dml_core.training.loop.fit` in this process (one worker, no Ray: the step cost is what
differs), from the same Fashion-MNIST shards, old model and seed. Samples/s is the median over the steps
after `--warmup` of (batch / time between consecutive step ends), data loading included; start-up is the
wall time of `fit` less its steps (the old model's pass over the training split for BCT's prototypes, and
PC's table, both once per run). The setups run in interleaved rounds; each figure is the median round.
Writes benchmarks/results/pc_throughput.json and .md.
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

from benchmarks.train_throughput import shard  # noqa: E402
from dml_core import storage  # noqa: E402
from dml_core.config import config_from_dict  # noqa: E402
from dml_core.training.loop import Worker, fit  # noqa: E402
from dml_core.training.metrics_log import read_metrics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETUPS = [("BCT alone", None), ("BCT + PC, precomputed", "precomputed"), ("BCT + PC, on the fly", "on_the_fly")]


def make_config(root: str, data: dict, name: str, args, steps: int, loss: dict | None = None):
    return config_from_dict({
        "run": {"name": name, "root": root},
        "data": {"dataset": data["name"], "version": data["version"], "root": data["root"],
                 "batch_size": args.batch_size, "p": args.batch_size // args.k, "k": args.k},
        "model": {"backbone": "small_cnn", "embedding_dim": 64, "backbone_options": {"widths": args.widths}},
        "loss": {"base": "info_nce", **(loss or {})},
        "train": {"steps": steps, "checkpoint_every": steps, "log_every": steps, "keep_best": 1},
        "ray": {"num_workers": 1},
    })


def old_checkpoint(root: str, data: dict, args) -> str:
    """The old model: the same architecture trained briefly (an equally heavy old model)."""
    urls: list[str] = []
    fit(make_config(root, data, "old", args, args.old_steps), data["manifest"],
        Worker(report=lambda metrics, url: urls.append(url)))
    return urls[-1]


def run(cfg, manifest) -> tuple[list[float], float]:
    """Step rates and start-up seconds of one `fit`."""
    t0 = time.perf_counter()
    fit(cfg, manifest, Worker())
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(storage.join(cfg.run_dir, "metrics.jsonl")) if "samples_per_s" in r]
    rates = [r["samples_per_s"] for r in recs]
    step_time = sum(cfg.data.batch_size / r for r in rates[1:])  # the first rate includes the start-up
    return rates, wall - step_time


def interleaved_step_times(root: str, data: dict, old: str, args) -> dict[str, list[float]]:
    """Seconds per `train_step` of each setup on the same cached batches, the setups taking turns step by
    step: a change in machine load hits all three alike (the `fit` runs above also read the data)."""
    from dml_core.data.train_reader import TrainReader
    from dml_core.training.build import build_loss, build_model_from_config, build_optimizer
    from dml_core.training.pc import old_model_inputs
    from dml_core.training.step import train_step

    manifest = data["manifest"]
    setups = []
    for i, (label, mode) in enumerate(SETUPS):
        loss_cfg = {"bct": {"old_checkpoint": old}, **({"pc": {"old_embeddings": mode}} if mode else {})}
        cfg = make_config(root, data, f"steps-{i}", args, args.steps, loss_cfg)
        torch.manual_seed(0)
        model = build_model_from_config(cfg)
        inputs = old_model_inputs(cfg, manifest)
        loss = build_loss(cfg, manifest.num_ids, inputs.prototypes, inputs.embeddings)
        setups.append((label, model, loss, build_optimizer(cfg, model, loss), inputs))
    reader = TrainReader.from_manifest(manifest, "train", rank=0, world_size=1, steps=10, num_workers=0,
                                       p=args.batch_size // args.k, k=args.k, image_size=28, channels=1)
    batches = [(b.images, b.labels, b.ids) for b in reader]
    times: dict[str, list[float]] = {label: [] for label, *_ in setups}
    for step in range(args.steps):
        for label, model, loss, opt, inputs in setups:
            images, labels, ids = batches[step % len(batches)]
            t0 = time.perf_counter()
            for _ in inputs.feed([(images, labels, ids)]):  # on the fly: the old model embeds the batch
                train_step(model, loss, images, labels, ids, opt)
            times[label].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=16, help="items per class (p = batch / k <= 5 training classes)")
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="small_cnn widths, old and new")
    ap.add_argument("--old-steps", type=int, default=30)
    ap.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST images per class to shard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    medians = {label: [] for label, _ in SETUPS}
    startup = {label: [] for label, _ in SETUPS}
    with tempfile.TemporaryDirectory(prefix="dml-pc-bench-") as root:
        data = shard(root, args.per_class)
        old = old_checkpoint(root, data, args)
        for rep in range(args.repeats):  # interleaved: a change in machine load hits every setup alike
            for i, (label, mode) in enumerate(SETUPS):
                loss = {"bct": {"old_checkpoint": old}}
                if mode is not None:
                    loss["pc"] = {"old_embeddings": mode}
                rates, start = run(make_config(root, data, f"bench-{i}-{rep}", args, args.steps, loss),
                                   data["manifest"])
                medians[label].append(statistics.median(rates[args.warmup:] or rates))
                startup[label].append(start)
                print(f"round {rep + 1}: {label}: {medians[label][-1]:.0f} samples/s, start-up {start:.1f} s",
                      flush=True)
        step_times = interleaved_step_times(root, data, old, args)
    base = medians[SETUPS[0][0]]
    results = {label: {"samples_per_s": statistics.median(medians[label]), "per_round": medians[label],
                       "vs_bct_per_round": [m / b for m, b in zip(medians[label], base)],
                       "startup_s": statistics.median(startup[label]), "startup_s_per_round": startup[label]}
               for label, _ in SETUPS}
    for label, _ in SETUPS:
        steady = step_times[label][args.warmup:]
        results[label]["step_ms_interleaved"] = 1e3 * statistics.median(steady)
        results[label]["step_ms_interleaved_vs_bct"] = statistics.median(steady) / statistics.median(
            step_times[SETUPS[0][0]][args.warmup:])
    meta = {"command": "python " + " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
            "batch_size": args.batch_size, "widths": args.widths, "threads": args.threads,
            "train_samples": data["manifest"].split("train").count, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "pc_throughput.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    write_table(meta, results, args)


def write_table(meta: dict, results: dict, args) -> None:
    lines = ["# PC training throughput", "", f"Command: `{meta['command']}`", "",
             f"{meta['cpu_count']} CPUs, {meta['threads']} torch thread(s), torch {meta['torch']}; small_cnn "
             f"{meta['widths']} old and new (an old model as heavy as the new one), InfoNCE + BCT, "
             f"{meta['batch_size']} images per step, one process (`fit` without Ray), {meta['train_samples']} "
             f"training images; median over steps {args.warmup + 1}..{args.steps}, {args.repeats} interleaved "
             f"rounds, the table shows the median round.", "",
             f"Machine load (1/5/15-min load average) before: {meta['loadavg_1_5_15_before']}, after: "
             f"{meta['loadavg_1_5_15_after']} (a shared machine).", "",
             "| setup | samples/s | each round | vs BCT alone, each round | start-up s | step ms, interleaved | "
             "vs BCT alone |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        rounds = ", ".join(f"{x:.0f}" for x in r["per_round"])
        ratios = ", ".join(f"{x:.2f}" for x in r["vs_bct_per_round"])
        lines.append(f"| {label} | {r['samples_per_s']:.0f} | {rounds} | {ratios} | {r['startup_s']:.1f} | "
                     f"{r['step_ms_interleaved']:.1f} | {r['step_ms_interleaved_vs_bct']:.2f} |")
    pre, fly = results[SETUPS[1][0]], results[SETUPS[2][0]]
    lines += ["", "Step ms, interleaved: the median time of one `train_step` on cached batches (no data loading), "
              "the three setups taking turns step by step, so load changes hit them alike.", "",
              f"Precomputed old embeddings run at {pre['samples_per_s'] / fly['samples_per_s']:.2f}x the "
              f"on-the-fly rate in `fit` and take {pre['step_ms_interleaved'] / fly['step_ms_interleaved']:.2f}x "
              f"its step time interleaved: the old model's pass over the training split is one BCT makes anyway for its "
              f"prototypes, so the table costs one lookup per step; on the fly the old model runs forward on "
              f"every batch. Start-up includes that pass (and, on the fly, loading the old model once more)."]
    with open(os.path.join(RESULTS, "pc_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

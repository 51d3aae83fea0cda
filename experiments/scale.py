"""Experiment 5: scale on paper. Step time at 1 and 2 workers and on a two-node local Ray cluster (same
per-worker batch), the bytes each step moves, and a model fitted to them that projects step time and the
gather's share to GPU clusters under stated assumptions (ASSUMPTIONS)."""
from __future__ import annotations

import os
import statistics

from dml_core import storage
from dml_core.child_process import stop_groups
from dml_core.training.metrics_log import read_metrics
from experiments.common import Context, run_dir, table

WARMUP = 20  # steps left out of the median
TINY = ["train.steps=4", "train.log_every=1", "data.source.max_per_class=40"]
# The projection's stated assumptions: an open_clip-style ViT-B/16 image tower trained in bf16.
ASSUMPTIONS = {"model_params": 86e6, "model_flops_per_image": 3 * 17.6e9, "embedding_dim": 512,
               "gpu_flops": 989e12, "mfu": 0.4, "bytes_per_value": 2,
               "intra_node_bw": 450e9, "inter_node_bw": 50e9, "gpus_per_node": 8, "latency_s": 30e-6}
GPUS, GLOBAL_BATCHES = (8, 64, 512), (32768, 65536, 131072)


def _median_step_s(ctx: Context, run: str, global_batch: int) -> float:
    recs = [r for r in read_metrics(storage.join(run_dir(ctx, run), "metrics.jsonl")) if "samples_per_s" in r]
    rates = [r["samples_per_s"] for r in recs if r["step"] > WARMUP] or [r["samples_per_s"] for r in recs]
    return global_batch / statistics.median(rates)


def _two_node_cluster(logs: str):
    """Head and worker node of 1 CPU each on this machine, started by the infra scripts: (address, nodes, env)."""
    from infra.ray_local import node_env, start_node, wait_for_nodes
    from infra.seaweedfs import free_port_pair  # a free port (and its neighbour, free too)

    port, env = free_port_pair(set()), node_env()
    address = f"127.0.0.1:{port}"
    os.makedirs(logs, exist_ok=True)
    nodes = [start_node("ray-head.sh", [f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                                        f"--temp-dir=/tmp/dmlray-x{port}"], f"{logs}/head.log", env)]
    try:
        wait_for_nodes(address, 1, nodes, logs)
        nodes.append(start_node("ray-worker.sh", [address, "--num-cpus=1", "--num-gpus=0"], f"{logs}/worker.log", env))
        wait_for_nodes(address, 2, nodes, logs)
    except BaseException:
        stop_groups([p for p, _ in nodes], grace=5.0)
        raise
    return address, nodes, env


def bytes_per_step(params: int, global_batch: int, dim: int, workers: int, value_bytes: int = 4) -> dict:
    """Bytes each worker sends per step: the embedding gather (values plus label and id columns) forward and
    its reduce-scatter backward, and DDP's ring all-reduce of the gradients."""
    share = (workers - 1) / workers
    gather = global_batch * (dim + 2) * value_bytes * share
    return {"gather": 2 * gather, "gradients": 2 * params * value_bytes * share}


def project(gpus: int, global_batch: int, a: dict = ASSUMPTIONS) -> dict:
    """Step time of the assumed model on `gpus` GPUs at `global_batch`: compute (encoder and the b x B loss at
    `mfu`) plus ring collectives at the slowest link's bandwidth (inter-node beyond one node)."""
    b = global_batch / gpus
    compute = (b * a["model_flops_per_image"] + 6 * b * global_batch * a["embedding_dim"]) / (a["gpu_flops"] * a["mfu"])
    bw = a["intra_node_bw"] if gpus <= a["gpus_per_node"] else a["inter_node_bw"]
    moved = bytes_per_step(int(a["model_params"]), global_batch, a["embedding_dim"], gpus, a["bytes_per_value"])
    steps = 2 * (gpus - 1)  # ring: latency per hop
    gather = moved["gather"] / bw + steps * a["latency_s"]
    grads = moved["gradients"] / bw + steps * a["latency_s"]
    total = compute + gather + grads
    return {"gpus": gpus, "global_batch": global_batch, "compute_s": compute, "gather_s": gather,
            "gradients_s": grads, "step_s": total, "gather_share": gather / total}


def measure(ctx: Context) -> dict:
    sets = TINY if ctx.tiny else []
    args = [a for s in sets for a in ("--set", s)]
    cfg_path = ctx.config("scale.yaml")
    out = {}
    for name, extra in (("1 worker", ["ray.num_workers=1"]), ("2 workers", ["ray.num_workers=2"])):
        run = f"scale-{name.split()[0]}w"
        ctx.dml("train", cfg_path, "--set", f"run.name={run}", *(a for s in extra for a in ("--set", s)), *args)
        out[name] = run
    if ctx.tiny:  # a two-node cluster run is tested in tests/tasks/test_train_recovery.py
        return out
    address, nodes, env = _two_node_cluster(os.path.join(ctx.out, "logs"))
    try:  # a process of its own: this one holds the local Ray of the other commands
        ctx.dml("train", cfg_path, "--set", "run.name=scale-2n", "--set", f"ray.address={address}",
                "--set", "ray.num_workers=2", *args, env=env)
        out["2 nodes"] = "scale-2n"
    finally:
        stop_groups([p for p, _ in nodes], grace=10.0)
        for _, log in nodes:
            log.close()
    return out


def run(ctx: Context) -> dict:
    from dml_core.config import load_config
    from dml_core.training.build import build_model_from_config

    runs = measure(ctx)
    cfg = load_config(ctx.config("scale.yaml"))
    params = sum(p.numel() for p in build_model_from_config(cfg).parameters())
    per_worker = cfg.data.batch_size
    measured = {}
    for name, run in runs.items():
        workers = 1 if name == "1 worker" else 2
        step = _median_step_s(ctx, run, per_worker * workers)
        moved = bytes_per_step(params, per_worker * workers, cfg.model.embedding_dim, workers)
        measured[name] = {"run": run, "workers": workers, "step_s": step, "bytes": moved}
    base = measured["1 worker"]["step_s"]
    for m in measured.values():
        m["communication_s"] = max(m["step_s"] - base, 0.0)
        sent = sum(m["bytes"].values())
        m["effective_bw"] = sent / m["communication_s"] if m["communication_s"] > 0 and sent else None
    projection = [project(g, b) for g in GPUS for b in GLOBAL_BATCHES]
    md = ["# Experiment 5: scale on paper", "", "## Measured (this machine)", "",
          table(["setup", "step ms", "communication ms", "bytes sent per worker per step"],
                [[k, f"{m['step_s'] * 1e3:.1f}", f"{m['communication_s'] * 1e3:.1f}",
                  f"{sum(m['bytes'].values()):,.0f}"] for k, m in measured.items()]),
          "## Projected (ASSUMPTIONS in experiments/scale.py)", "",
          table(["GPUs", "global batch", "step ms", "compute ms", "gather ms", "gradients ms", "gather share"],
                [[str(p["gpus"]), f"{p['global_batch']:,}", f"{p['step_s'] * 1e3:.1f}", f"{p['compute_s'] * 1e3:.1f}",
                  f"{p['gather_s'] * 1e3:.2f}", f"{p['gradients_s'] * 1e3:.2f}", f"{p['gather_share']:.2%}"]
                 for p in projection])]
    return ctx.write("scale", {"params": params, "measured": measured, "assumptions": ASSUMPTIONS,
                               "projection": projection}, "\n".join(md))

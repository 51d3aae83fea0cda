"""Experiment 4: memory. The largest global batch whose training step fits a memory budget, plain
backpropagation against the tiled loss with gradient caching, same model (experiments/configs/memory.yaml).
Each (method, batch) step runs in a fresh process; its peak is the resident-set high-water mark above the
memory held once the model and the batch exist (benchmarks/loss_memory.py's `PeakRSS`)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from experiments.common import CONFIGS, REPO, Context, table

METHODS = {"plain": ["loss.tiled_above=1099511627776", "train.grad_cache_chunk=null"],
           "tiled + gradient cache": ["loss.tiled_above=1"]}
GIB = 1024 ** 3


def step_once(method: str, batch: int) -> dict:
    """One training step of the config's model on a random batch (classes of 4) in this process."""
    import torch

    from benchmarks.loss_memory import PeakRSS, rss_bytes
    from dml_core.config import load_config, parse_overrides
    from dml_core.gradcache import GradCache
    from dml_core.training.build import build_loss, build_model_from_config, build_optimizer
    from dml_core.training.step import train_step

    sets = [f"data.batch_size={batch}", f"data.p={batch // 4}", "data.k=4", *METHODS[method]]
    cfg = load_config(f"{CONFIGS}/memory.yaml", parse_overrides(sets))
    if cfg.train.grad_cache_chunk:
        cfg.train.grad_cache_chunk = min(cfg.train.grad_cache_chunk, batch)
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    loss = build_loss(cfg)
    optimizer = build_optimizer(cfg, model, loss)
    cache = GradCache(model, loss, cfg.train.grad_cache_chunk) if cfg.train.grad_cache_chunk else None
    size, channels = cfg.model.image_size, cfg.model.in_channels
    images = torch.rand(batch, channels, size, size)
    labels, ids = torch.arange(batch) // 4, torch.arange(batch)
    base = rss_bytes()
    with PeakRSS() as peak:
        import time

        t0 = time.perf_counter()
        train_step(model, loss, images, labels, ids, optimizer, grad_cache=cache)
        seconds = time.perf_counter() - t0
    return {"method": method, "batch": batch, "peak_bytes": peak.peak - base, "held_bytes": base,
            "step_seconds": seconds, "peak_method": peak.method}


def _measure(method: str, batch: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "experiments.memory", method, str(batch)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "batch": batch, "failed": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def search(method: str, budget: int, first: int, cap: int, max_step_s: float) -> list[dict]:
    """Double the batch from `first` until the step exceeds the budget, `cap` or `max_step_s`; a batch whose
    peak, extrapolated linearly from the last two, exceeds twice the budget is not run."""
    points, batch = [], first
    while batch <= cap:
        if len(points) >= 2:
            a, b = points[-2], points[-1]
            slope = (b["peak_bytes"] - a["peak_bytes"]) / (b["batch"] - a["batch"])
            predicted = b["peak_bytes"] + slope * (batch - b["batch"])
            if predicted > 2 * budget:
                points.append({"method": method, "batch": batch, "not_run": f"predicted {predicted / GIB:.1f} GiB"})
                break
        point = _measure(method, batch)
        points.append(point)
        print(json.dumps(point), flush=True)
        if "failed" in point or point["peak_bytes"] > budget or point["step_seconds"] > max_step_s:
            break
        batch *= 2
    return points


def run(ctx: Context, budget_gib: float = 8.0, cap: int = 131072, max_step_s: float = 150.0) -> dict:
    first, cap, budget = (256, 1024, 1.0 * GIB) if ctx.tiny else (1024, cap, budget_gib * GIB)
    ctx.log.append("python -m experiments.run memory")
    found = {m: search(m, budget, first, cap, max_step_s) for m in METHODS}
    largest = {m: max((p["batch"] for p in pts if p.get("peak_bytes", budget + 1) <= budget), default=None)
               for m, pts in found.items()}
    rows = [[m, str(p["batch"]), f"{p['peak_bytes'] / GIB:.3f}" if "peak_bytes" in p else "-",
             f"{p['step_seconds']:.2f}" if "step_seconds" in p else "-",
             p.get("not_run") or ("fits" if p.get("peak_bytes", budget + 1) <= budget else "over budget")]
            for m, pts in found.items() for p in pts]
    md = [f"# Experiment 4: memory (budget {budget / GIB:g} GiB)", "",
          table(["method", "global batch", "peak GiB above model + batch", "step s", ""], rows),
          "Largest batch within the budget: " + ", ".join(f"{m}: {b}" for m, b in largest.items())]
    return ctx.write("memory", {"budget_bytes": budget, "points": found, "largest": largest}, "\n".join(md))


if __name__ == "__main__":
    args = argparse.ArgumentParser(description="one measured step (used by experiment 4's search)")
    args.add_argument("method", choices=list(METHODS))
    args.add_argument("batch", type=int)
    ns = args.parse_args()
    print(json.dumps(step_once(ns.method, ns.batch)))

"""Run the experiments of EXPERIMENTS.md, all or by name; each writes experiments/results/<name>.json and .md
and its plots. A run started again reuses every finished trial and run (sweeps and training resume).

    python -m experiments.run                       # all five, 3 seeds (at most 90 min on 2 CPU cores)
    python -m experiments.run tcm compat --seeds 1  # some of them
    python -m experiments.run --tiny --root /tmp/x  # a few steps each: what the tests run
"""
from __future__ import annotations

import argparse
import json
import os
import time

from experiments import batch_size, compat, memory, scale, tcm
from experiments.common import REPO, Context

EXPERIMENTS = {"tcm": tcm.run, "batch_size": batch_size.run, "compat": compat.run, "memory": memory.run,
               "scale": scale.run}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a few steps on little data (the tests)")
    ap.add_argument("--root", default=os.path.join(REPO, "experiments_storage"), help="run.root of every run")
    ap.add_argument("--out", default=os.path.join(REPO, "experiments", "results"), help="results folder")
    ns = ap.parse_args(argv)
    unknown = [n for n in ns.names if n not in EXPERIMENTS]
    if unknown:
        ap.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    from tasks.ray_runtime import ray_session

    timings = {}
    with ray_session():  # one local Ray for every dml command of the run, as `dml run` does for a story
        for name in ns.names or list(EXPERIMENTS):
            ctx = Context(root=os.path.abspath(ns.root), out=os.path.abspath(ns.out), seeds=ns.seeds, tiny=ns.tiny)
            t0 = time.perf_counter()
            EXPERIMENTS[name](ctx)
            timings[name] = round(time.perf_counter() - t0, 1)
            print(f"[experiments] {name}: {timings[name]:.0f} s", flush=True)
    path = os.path.join(ns.out, "timings.json")
    previous = json.load(open(path)) if os.path.exists(path) else {}
    with open(path, "w") as f:
        json.dump({**previous, **timings}, f, indent=1)
    return timings


if __name__ == "__main__":
    main()

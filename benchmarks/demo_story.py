"""The demo's story (configs/demo.yaml) measured with the retrain flow's own stages, and the demo's wall time.

    python benchmarks/demo_story.py [--config configs/demo.yaml] [--seeds 0 1] [--set key=value ...] [--wall]
    python benchmarks/demo_story.py --wall-only   # add the wall time to the last results

For each seed offset (added to every run's train.seed) it shards the config's data.source into a fresh storage
root and runs the config's `runs` in order as `flows.retrain` does, without Prefect: train (Ray), evaluate
against what the registry serves and the raw-pixel floor (`tasks.evaluate.run_evaluation`), then serve as the
gate decided (`tasks.update.run_update`). `--wall` also times `bash scripts/demo.sh` from a fresh clone of
this repository's HEAD into a new virtual environment (set-up included; pip's cache and the Debian packages
as this machine has them). Writes benchmarks/results/demo_story.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dml_core import yaml12  # noqa: E402
from dml_core.config import config_from_dict, parse_overrides, run_overrides  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")


def run_config(config: str, item, root: str, seed: int, sets: list[str]):
    """The config of one story run as `dml run` makes it, with `seed` added to its train.seed."""
    from dml_core.config import load_config
    from dml_core.gallery.gallery_model import resolve_gallery_checkpoints

    cfg = load_config(config, parse_overrides(run_overrides(item, [*sets, f"run.root={root}"])))
    cfg.train.seed += seed
    return resolve_gallery_checkpoints(cfg)


def one_run(cfg) -> dict:
    from dml_core.gallery.gallery_model import current_serving
    from dml_core.metrics.gate import GateDecision
    from tasks.evaluate import run_evaluation
    from tasks.train import run_training
    from tasks.update import run_update

    times, t = {}, time.perf_counter()
    trained = run_training(cfg)
    times["train"], t = time.perf_counter() - t, time.perf_counter()
    old, served = current_serving(cfg)
    evaluation = run_evaluation(cfg, trained.checkpoint, old, served=served)
    times["evaluate"], t = time.perf_counter() - t, time.perf_counter()
    decision = GateDecision.from_dict(evaluation["metrics"]["gate"])
    update = run_update(cfg, trained.checkpoint, decide=lambda current: decision)
    times["update"] = time.perf_counter() - t
    row = {k: v for k, v in evaluation["summary"].items() if k not in ("reasons", "finished_at")}
    return {**row, "action": update.action, "backfill": update.backfilled,
            "seconds": {k: round(v, 1) for k, v in times.items()}}


def story(config: str, raw: dict, seed: int, sets: list[str], work: str) -> dict:
    from dml_core.config import RunItem
    from tasks.shard import run_shard, with_version

    root = os.path.join(work, f"seed{seed}")
    t0 = time.perf_counter()
    shard_cfg = run_config(config, RunItem("shard"), root, seed, sets)
    version = run_shard(shard_cfg)["version"]
    out = {"seed": seed, "shard_seconds": round(time.perf_counter() - t0, 1), "runs": []}
    for item in (RunItem(**r) for r in raw["runs"]):
        row = one_run(with_version(run_config(config, item, root, seed, sets), version))
        print(json.dumps(row), flush=True)
        out["runs"].append(row)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["checks"] = checks(out["runs"])
    return out


def checks(rows: list[dict]) -> dict:
    """What the demo claims, per story: v1 above the floor; v2 better than v1 on its own; v3 backfilled; v4
    rejected; and nothing below the floor served."""
    by = {r["run"]: r for r in rows}
    return {"v1 first model above the floor": by["v1"]["verdict"] == "first model" and not by["v1"]["below_floor"],
            "v2 M(new,new) > v1 M(old,old)": by["v2"]["m_new_new"] > by["v1"]["m_new_new"],
            "v3 backfilled": by["v3"]["verdict"] == "backfill", "v4 rejected": by["v4"]["verdict"] == "rejected",
            "nothing below the floor served": all(r["verdict"] == "rejected" for r in rows if r["below_floor"])}


def demo_wall_seconds(sets: list[str]) -> dict:
    """`bash scripts/demo.sh` from a fresh clone of HEAD into a new virtual environment: its wall time."""
    with tempfile.TemporaryDirectory(prefix="demo-wall-") as tmp:
        subprocess.run(["git", "clone", "-q", REPO, f"{tmp}/repo"], check=True)
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        t = time.perf_counter()
        done = subprocess.run(["bash", "scripts/demo.sh", "--set", f"run.root={tmp}/storage",
                               *(a for s in sets for a in ("--set", s))], cwd=f"{tmp}/repo", env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"demo.sh failed:\n{done.stderr[-3000:]}")
        table = open(f"{tmp}/storage/demo_summary.md").read()
    return {"seconds": round(seconds, 1), "summary": table}


def markdown(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["# Demo story (configs/demo.yaml through the retrain stages)", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; load average before {result['load_before']}, after "
             f"{result['load_after']}.", "", f"Gate: {result['gate']} (M = MAP@R; NFR from Recall@1 flips, METHODS 6). "
             "Floor: raw pixels at the model's input size, same split and metric code; margin = MAP@R - floor.", "",
             "| seed | run | Recall@1 | floor R@1 | MAP@R | floor MAP@R | margin | M(new,new) | M(new,old) | "
             "M(served) | NFR | verdict | backfill | train s | evaluate s | update s |",
             "|---|---|" + "---:|" * 9 + "---|---|---:|---:|---:|"]
    for s in result["stories"]:
        for r in s["runs"]:
            t = r["seconds"]
            verdict = r["verdict"] + (" (below floor)" if r["below_floor"] else "")
            lines.append(f"| {s['seed']} | {r['run']} | {f(r['recall_at_1'])} | {f(r['floor_recall_at_1'])} | "
                         f"{f(r['map_at_r'])} | {f(r['floor_map_at_r'])} | {f(r['map_at_r'] - r['floor_map_at_r'])} | "
                         f"{f(r['m_new_new'])} | {f(r['m_new_old'])} | {f(r['served'])} | {f(r['nfr'])} | {verdict} | "
                         f"{'yes' if r['backfill'] else 'no'} | {t['train']} | {t['evaluate']} | {t['update']} |")
    lines += ["", "| seed | shard s | story s (from sharding) | " + " | ".join(result["stories"][0]["checks"]) + " |",
              "|---|---:|---:|" + "---|" * len(result["stories"][0]["checks"])]
    lines += [f"| {s['seed']} | {s['shard_seconds']} | {s['total_seconds']} | "
              + " | ".join("yes" if ok else "NO" for ok in s["checks"].values()) + " |" for s in result["stories"]]
    if result.get("demo_wall"):
        lines += ["", f"`bash scripts/demo.sh` from a fresh clone into a new virtual environment (set-up included): "
                      f"**{result['demo_wall']['seconds']:.0f} s**. Its summary table:", "",
                  result["demo_wall"]["summary"].rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--set", action="append", default=[], help="key.path=value for every run (after its own)")
    ap.add_argument("--wall", action="store_true", help="also time scripts/demo.sh from a fresh clone")
    ap.add_argument("--wall-only", action="store_true", help="only that, added to the results in --out")
    ap.add_argument("--out", default=os.path.join(RESULTS, "demo_story"))
    args = ap.parse_args()
    if args.wall_only:
        with open(args.out + ".json") as fh:
            result = json.load(fh)
        result["demo_wall"] = demo_wall_seconds(args.set)
        return write(result, args.out)
    with open(args.config) as fh:
        raw = yaml12.load(fh.read())
    config_from_dict({k: v for k, v in raw.items() if k != "runs"})  # a bad config fails before any work
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()} CPUs ({platform.platform()})",
              "load_before": [round(x, 2) for x in os.getloadavg()], "gate": raw.get("gate"), "stories": []}
    with tempfile.TemporaryDirectory(prefix="demo-story-") as work:
        for seed in args.seeds:
            result["stories"].append(story(args.config, raw, seed, args.set, work))
    if args.wall:
        result["demo_wall"] = demo_wall_seconds(args.set)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write(result, args.out)


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    with open(out + ".md", "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

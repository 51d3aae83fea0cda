"""The demo's three-run story (configs/demo.yaml) measured on the library directly, stage by stage.

    python benchmarks/demo_story.py [--config configs/demo.yaml] [--seeds 0 1] [--set train.steps=300 ...]

For each seed (added to every run's train.seed) it shards the config's data.source into a fresh storage root, then
runs the config's `runs` in order: train, embed the evaluation split with the new and the registry's gallery
model, evaluate (Recall@1, MAP@R, OPIS, compatibility, gate; METHODS 4-6), then register the new model as
query model or backfill the gallery, build its index and switch (tasks.update.run_update). Writes
benchmarks/results/demo_story.json and .md: per run the metrics, the verdict and each stage's seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core import yaml12  # noqa: E402
from dml_core.config import config_from_dict, parse_overrides  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORY_KEYS = ("runs",)  # top-level fields this script reads itself (the `dml` command's, not the library's)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dotted(items: dict) -> dict:
    """A run's `set` ({"loss.bct.old_checkpoint": "gallery"}) as a nested override dict."""
    return parse_overrides([f"{k}={json.dumps(v)}" for k, v in items.items()])


def shard(raw: dict, root: str):
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources.from_config import build_source

    data = raw["data"]
    return shard_dataset(build_source(data["source"]), root, data["dataset"], **data.get("sharding", {}))


def run_config(raw: dict, run: dict, root: str, seed: int, extra: dict):
    """The library config of one story run (the story and sharding fields left out), `gallery` resolved."""
    from dml_core.gallery.gallery_model import resolve_gallery_checkpoints

    over = merge(dotted(run.get("set") or {}), extra)
    cfg_raw = merge(merge(raw, over), {"run": {"name": run["name"], "root": root}})
    cfg_raw.setdefault("train", {})["seed"] = cfg_raw["train"].get("seed", 0) + seed
    cfg_raw = {k: v for k, v in cfg_raw.items() if k not in STORY_KEYS}
    return resolve_gallery_checkpoints(config_from_dict(cfg_raw, source=f"run {run['name']}"))


def one_run(cfg, manifest, registry, gallery: str, work: str) -> dict:
    from dml_core.gallery.registry import ModelRef
    from dml_core.metrics.evaluate import evaluate_embeddings
    from dml_core.metrics.gate import UpdateGate
    from dml_core.training.embed import embed_split
    from tasks.train import run_training
    from tasks.update import run_update

    times = {}
    t = time.perf_counter()
    trained = run_training(cfg)
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    entry = registry.gallery(gallery)
    new = embed_split(trained.checkpoint, manifest, "eval", batch_size=cfg.data.eval_batch_size)
    old = embed_split(entry.gallery_model.checkpoint, manifest, "eval",
                      batch_size=cfg.data.eval_batch_size) if entry else None
    times["embed_eval"] = time.perf_counter() - t

    t = time.perf_counter()
    gate = UpdateGate(cfg.gate.max_nfr, cfg.gate.min_gain, cfg.gate.metric)
    report = evaluate_embeddings(new.z, new.labels, old_z=old.z if old else None, gate=gate,
                                 plot_url=os.path.join(work, f"{cfg.run.name}-utility.png"))
    times["evaluate"] = time.perf_counter() - t

    def decide(old_model: ModelRef):
        assert old_model.checkpoint == entry.gallery_model.checkpoint, "the gate compared another gallery model"
        return report.gate

    t = time.perf_counter()
    update = run_update(cfg, trained.checkpoint, decide=decide)
    times["update"] = time.perf_counter() - t

    row = {"run": cfg.run.name, "gallery_model": entry.gallery_model.version if entry else None,
           "recall_at_1": report.retrieval.recall[1], "map_at_r": report.retrieval.map_at_r,
           "opis": report.opis.opis, "eps_opis": report.opis.eps_opis,
           "m_new_old": None, "m_old_old": None, "nfr": None, "action": update.action,
           "backfill": update.backfilled, "reasons": report.gate.reasons() if report.gate else [],
           "eval_queries": report.retrieval.num_queries,
           "seconds": {k: round(v, 1) for k, v in times.items()}}
    if report.compatibility is not None:
        s = report.compatibility.scores[cfg.gate.metric]
        row.update(m_new_old=s.new_old, m_old_old=s.old_old, nfr=report.compatibility.flips["new_old"].nfr,
                   verdict="compatible" if report.gate.allowed else "backfill",
                   cross={m: {"new_old": v.new_old, "old_old": v.old_old, "new_new": v.new_new}
                          for m, v in report.compatibility.scores.items()})
    else:
        row["verdict"] = "first model"
    return row


def story(raw: dict, seed: int, extra: dict, work: str) -> dict:
    from dml_core.gallery.registry import Registry
    from dml_core.gallery.update import check_index

    root = os.path.join(work, f"seed{seed}")
    t0 = time.perf_counter()
    manifest = shard(raw, root)
    out = {"seed": seed, "shard_seconds": round(time.perf_counter() - t0, 1),
           "splits": {s: manifest.splits[s].count for s in manifest.splits}, "runs": []}
    registry = Registry(root, check_index=check_index)
    gallery = raw.get("backfill", {}).get("gallery") or manifest.name
    for run in raw["runs"]:
        entry = registry.gallery(gallery)
        cfg = run_config(raw, run, root, seed, extra)
        cfg.data.version = manifest.version
        row = one_run(cfg, manifest, registry, gallery, work)
        print(json.dumps({k: v for k, v in row.items() if k != "reasons"}), flush=True)
        out["runs"].append(row)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["story_holds"] = [r["verdict"] for r in out["runs"]] == ["first model", "compatible", "backfill"]
    return out


def markdown(result: dict) -> str:
    lines = ["# Demo story (configs/demo.yaml on the library)", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; load average before {result['load_before']}, after "
             f"{result['load_after']}.", "",
             f"Gate: {result.get('gate')}; M = the gate metric; NFR from Recall@1 flips (METHODS 6).", "",
             "| seed offset | run | Recall@1 | MAP@R | OPIS | M(new,old) | M(old,old) | NFR | R@1(new,old) | verdict | backfill | "
             "train s | embed eval s | evaluate s | update s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for s in result["stories"]:
        for r in s["runs"]:
            t = r["seconds"]
            lines.append(f"| {s['seed']} | {r['run']} | {f(r['recall_at_1'])} | {f(r['map_at_r'])} | {f(r['opis'])} | "
                         f"{f(r['m_new_old'])} | {f(r['m_old_old'])} | {f(r['nfr'])} | "
                         f"{f(r.get('cross', {}).get('recall_at_1', {}).get('new_old'))} | {r['verdict']} | "
                         f"{'yes' if r['backfill'] else 'no'} | {t['train']} | {t['embed_eval']} | "
                         f"{t['evaluate']} | {t['update']} |")
    lines += ["", "| seed offset | shard s | all three runs s (from sharding) | story holds |", "|---|---:|---:|---|"]
    lines += [f"| {s['seed']} | {s['shard_seconds']} | {s['total_seconds']} | {s['story_holds']} |"
              for s in result["stories"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--set", action="append", default=[], help="key.path=value for every run (after its own)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "demo_story"))
    args = ap.parse_args()
    with open(args.config) as fh:
        raw = yaml12.load(fh.read())
    extra = parse_overrides(args.set)
    raw = merge(raw, {k: v for k, v in extra.items() if k == "data"})  # data.source / sharding for sharding too
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()} CPUs ({platform.platform()})",
              "load_before": [round(x, 2) for x in os.getloadavg()], "gate": raw.get("gate"), "stories": []}
    with tempfile.TemporaryDirectory(prefix="demo-story-") as work:
        for seed in args.seeds:
            result["stories"].append(story(raw, seed, extra, work))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

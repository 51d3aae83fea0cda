"""Backfill paths (METHODS 6.1) on the many-class glyph benchmark: serve the old gallery, transform it with
FCT's h (without and with side-info), backfill part of it in FastFill's order, or backfill it all.

    python benchmarks/backfill_paths.py [--seeds 0 1 2] [--quick]

One dataset (font_glyphs variant many, the first --max-classes code points, sharded as configs/demo.yaml:
held-out classes split into eval and gallery). Per seed, in this process (`loop.fit`, no Ray): an OLD model on
the first --old-classes training classes, a NEW model (wider, longer) on all of them, a small SIDE-INFO model
trained self-supervised; the training split embedded by the three; h trained on those embeddings
(`fit_transformation`) without and with side-info, both with FastFill's uncertainty. Evaluated leave-one-out on
the eval split (held-out classes): M(old,old), M(new,old), M(new,h(old)) for each h, M(new,new), MAP@R and
Recall@1, beside the raw-pixel floor; gap closed = (M(new,h) - M(old,old)) / (M(new,new) - M(old,old)); the
backfill curve (21 points) and its area in random, uncertainty and oracle order (the side-info h). Cost, once
(the first seed): items/s of transforming the gallery split's stored old (+ side) embeddings against
re-embedding its images with the new model, in this process with the same torch threads.

Writes benchmarks/results/backfill_paths.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dml_core.config import TransformationSection, config_from_dict  # noqa: E402
from dml_core.metrics.backfill_curve import ORDERS, backfill_curve, backfill_order  # noqa: E402
from dml_core.metrics.retrieval import evaluate_retrieval  # noqa: E402
from dml_core.training.embed import embed_split, load_checkpoint_model  # noqa: E402
from dml_core.training.loop import Worker, fit  # noqa: E402
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
METRICS = ("map_at_r", "recall_at_1")
SETTINGS = ("old/old", "new/old", "new/h(old)", "new/h(old,side)", "new/new")
THREADS = 2
FULL = {"max_classes": 200, "image_size": 24, "eval_class_fraction": 0.3, "old_classes": 70, "old_steps": 300,
        "new_steps": 600, "side_steps": 300, "h_steps": 1500, "h_batch": 256, "branch_width": 128,
        "trunk_width": 512}
QUICK = {"max_classes": 40, "image_size": 16, "eval_class_fraction": 0.4, "old_classes": 16, "old_steps": 20,
         "new_steps": 30, "side_steps": 10, "h_steps": 40, "h_batch": 128, "branch_width": 32, "trunk_width": 64}


def shard(work: str, s: dict) -> dict:
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import FontGlyphSource
    from dml_core.metrics.floor import pixel_floor

    t = time.perf_counter()
    src = FontGlyphSource(image_size=s["image_size"], variant="many", max_classes=s["max_classes"],
                          render_workers=THREADS)
    m = shard_dataset(src, work, "glyphs-many", seed=1, eval_class_fraction=s["eval_class_fraction"],
                      gallery_fraction=0.5, max_shard_samples=5000)
    seconds = time.perf_counter() - t
    floor = pixel_floor(m, "eval", image_size=s["image_size"], channels=1, ks=(1,), cache=False)
    info = {"name": m.name, "version": m.version, "classes": m.num_classes, "train_classes": m.num_train_classes,
            "held_out_classes": m.num_classes - m.num_train_classes,
            "split_images": {k: v.count for k, v in m.splits.items()}, "shard_seconds": round(seconds, 1)}
    return {"manifest": m, "root": work, "info": info,
            "floor": {"map_at_r": floor["map_at_r"], "recall_at_1": floor["recall_at_k"]["1"]}}


def model_config(dataset: dict, name: str, seed: int, steps: int, model: dict, **over) -> "Config":  # noqa: F821
    m = dataset["manifest"]
    raw = {"run": {"name": name, "root": dataset["root"]},
           "data": {"dataset": m.name, "version": m.version, "root": dataset["root"], "batch_size": 64, "p": 16, "k": 4},
           "model": {"backbone": "small_cnn", "embedding_dim": 64, **model},
           "loss": {"base": "info_nce", "tau": 0.1},
           "train": {"steps": steps, "lr": 3e-3, "warmup_steps": min(20, steps // 5), "checkpoint_every": steps,
                     "keep_best": 1, "log_every": max(1, steps // 3), "seed": seed},
           "ray": {"num_workers": 1}}
    for section, values in over.items():
        raw[section].update(values)
    return config_from_dict(raw)


def train_models(data: dict, s: dict, seed: int) -> tuple[dict, dict]:
    """The old, new and side-info models of `seed` (trained in this process) and their training seconds."""
    size = s["image_size"]
    configs = {
        "old": model_config(data, f"old-{seed}", seed, s["old_steps"],
                            {"image_size": size, "backbone_options": {"widths": [16, 32, 64]}},
                            data={"train_classes": s["old_classes"]}),
        "new": model_config(data, f"new-{seed}", seed, s["new_steps"],
                            {"image_size": size, "backbone_options": {"widths": [32, 64, 128]}}),
        "side": model_config(data, f"side-{seed}", seed, s["side_steps"],
                             {"image_size": size, "embedding_dim": 32, "backbone_options": {"widths": [16, 32]}},
                             data={"p": None, "k": None, "augment": True}, loss={"objective": "self_supervised"}),
    }
    models, seconds = {}, {}
    for name, cfg in configs.items():
        t = time.perf_counter()
        fit(cfg, data["manifest"], Worker())
        seconds[f"train_{name}"] = round(time.perf_counter() - t, 1)
        models[name] = load_checkpoint_model(os.path.join(cfg.run_dir, CHECKPOINTS, checkpoint_dir_name(cfg.train.steps)))
    return models, seconds


def embed_all(models: dict, manifest, splits=("train", "eval", "gallery")) -> dict:
    """{split: {model name: z, "labels": .., "ids": ..}}, rows in the same (reader) order for every model."""
    out = {}
    for split in splits:
        row = {}
        for name, model in models.items():
            z, labels, ids = embed_split(model, manifest, split, batch_size=512)
            if "ids" in row and not torch.equal(row["ids"], ids):
                raise RuntimeError(f"{split}: models embedded the items in different orders")
            row.update({name: z, "labels": labels, "ids": ids})
        out[split] = row
    return out


def train_h(emb: dict, s: dict, seed: int, work: str, side: bool) -> tuple:
    from dml_core.models.transformation import load_transformation
    from dml_core.training.transformation import TransformationData, fit_transformation

    tr = emb["train"]
    t = TransformationSection(branch_width=s["branch_width"], trunk_width=s["trunk_width"], uncertainty=True,
                              steps=s["h_steps"], batch_size=s["h_batch"], checkpoint_every=s["h_steps"])
    data = TransformationData(tr["old"], tr["new"], tr["labels"], tr["side"] if side else None)
    out = fit_transformation(t, data, os.path.join(work, f"h-{'side' if side else 'plain'}-{seed}"), Worker(), seed)
    return load_transformation(out["checkpoint"]), {"mse_train": round(out["mse"], 4), "loss": round(out["loss"], 4)}


def scores(query, gallery, labels) -> dict:
    r = evaluate_retrieval(query, labels, ks=(1,), gallery_z=gallery, gallery_labels=labels, exclude_self=True)
    return {"map_at_r": r.map_at_r, "recall_at_1": r.recall[1]}


def gap_closed(m: dict, setting: str, metric: str) -> float | None:
    lo, hi = m["old/old"][metric], m["new/new"][metric]
    return None if hi <= lo else (m[setting][metric] - lo) / (hi - lo)


def one_seed(data: dict, s: dict, seed: int, work: str, measure_cost: bool) -> dict:
    from dml_core.training.transformation import apply_transformation

    t0 = time.perf_counter()
    models, seconds = train_models(data, s, seed)
    t = time.perf_counter()
    emb = embed_all(models, data["manifest"])
    seconds["embed"] = round(time.perf_counter() - t, 1)
    hs, h_info = {}, {}
    for side in (False, True):
        t = time.perf_counter()
        key = "side" if side else "plain"
        hs[key], h_info[key] = train_h(emb, s, seed, work, side)
        seconds[f"train_h_{key}"] = round(time.perf_counter() - t, 1)
    ev = emb["eval"]
    z_plain, _ = apply_transformation(hs["plain"], ev["old"])
    z_side, log_var = apply_transformation(hs["side"], ev["old"], ev["side"])
    galleries = {"old/old": ("old", ev["old"]), "new/old": ("new", ev["old"]), "new/h(old)": ("new", z_plain),
                 "new/h(old,side)": ("new", z_side), "new/new": ("new", ev["new"])}
    t = time.perf_counter()
    m = {name: scores(ev[q], g, ev["labels"]) for name, (q, g) in galleries.items()}
    gap = {name: {k: gap_closed(m, name, k) for k in METRICS} for name in ("new/h(old)", "new/h(old,side)")}
    orders = {kind: backfill_order(kind, ev["ids"].numpy(), log_var=log_var, new=ev["new"], transformed=z_side,
                                   seed=seed) for kind in ORDERS}
    curves = {kind: backfill_curve(ev["new"], ev["labels"], ev["new"], z_side, order, metric="map_at_r").to_dict()
              for kind, order in orders.items()}
    seconds["evaluate"] = round(time.perf_counter() - t, 1)
    out = {"seed": seed, "metrics": m, "gap_closed": gap, "h": h_info, "curves": curves,
           "uncertainty_minus_random": curves["uncertainty"]["area"] - curves["random"]["area"],
           "log_var_distance_spearman": spearman(log_var.numpy(), (z_side - ev["new"]).norm(dim=1).numpy())}
    if measure_cost:
        out["cost"] = cost(hs, models["new"], emb["gallery"], data["manifest"])
    seconds["total"] = round(time.perf_counter() - t0, 1)
    out["seconds"] = seconds
    print(json.dumps({k: v for k, v in out.items() if k != "curves"}), flush=True)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cost(hs: dict, new_model, gallery: dict, manifest) -> dict:
    """Items/s of h on the gallery's stored vectors against the new model on its images (read and decoded)."""
    from dml_core.training.transformation import apply_transformation

    n = len(gallery["old"])
    out = {"gallery_items": n, "torch_threads": torch.get_num_threads()}
    apply_transformation(hs["side"], gallery["old"][:512], gallery["side"][:512])  # warm-up
    for key, side in (("transform_plain", None), ("transform_side", gallery["side"])):
        t = time.perf_counter()
        apply_transformation(hs["plain" if side is None else "side"], gallery["old"], side)
        out[f"{key}_items_per_s"] = round(n / (time.perf_counter() - t))
    t = time.perf_counter()
    embed_split(new_model, manifest, "gallery", batch_size=512)
    out["reembed_items_per_s"] = round(n / (time.perf_counter() - t))
    out["ratio_side"] = round(out["transform_side_items_per_s"] / out["reembed_items_per_s"], 1)
    out["ratio_plain"] = round(out["transform_plain_items_per_s"] / out["reembed_items_per_s"], 1)
    return out


def summarise(seeds: list[dict], floor: dict, info: dict) -> dict:
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    diffs = [r["uncertainty_minus_random"] for r in seeds]
    gap = {name: {k: mean([r["gap_closed"][name][k] for r in seeds if r["gap_closed"][name][k] is not None])
                  for k in METRICS} for name in ("new/h(old)", "new/h(old,side)")}
    new_new = mean([r["metrics"]["new/new"]["map_at_r"] for r in seeds])
    return {
        "metrics_mean": {name: {k: mean([r["metrics"][name][k] for r in seeds]) for k in METRICS} for name in SETTINGS},
        "gap_closed_mean": gap,
        "curve_mean": {kind: mean([r["curves"][kind]["area"] for r in seeds]) for kind in ORDERS},
        "uncertainty_minus_random": {"mean": mean(diffs), "min": min(diffs), "max": max(diffs),
                                     "seeds_positive": sum(d > 0 for d in diffs), "seeds": len(diffs)},
        "checks": {"held-out classes >= 60": info["held_out_classes"] >= 60,
                   "M(new,new) MAP@R <= 0.9 (room to move)": new_new <= 0.9,
                   "M(old,old) above the floor (MAP@R)": all(r["metrics"]["old/old"]["map_at_r"] > floor["map_at_r"]
                                                            for r in seeds)},
        "goals": {"gap closed >= 80% (MAP@R, side-info h, mean)": gap["new/h(old,side)"]["map_at_r"] >= 0.8,
                  "uncertainty area > random area (mean)": mean(diffs) > 0,
                  "transform / re-embed >= 20x": seeds[0]["cost"]["ratio_side"] >= 20},
    }


def markdown(res: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    s, info, floor, summ = res["settings"], res["dataset"], res["floor"], res["summary"]
    fl = f"{floor['map_at_r']:.4f} / {floor['recall_at_1']:.4f}"
    lines = ["# Backfill paths: FCT transformation and FastFill order (glyphs, many)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}, torch {res['torch']}, {THREADS} torch threads; load average before "
             f"{res['load_before']}, after {res['load_after']}; total {res['total_seconds']:.0f} s.", "",
             f"Data: font_glyphs many, first {s['max_classes']} code points at {s['image_size']} px, {info['classes']} "
             f"classes ({info['train_classes']} training, {info['held_out_classes']} held out), eval split "
             f"{info['split_images']['eval']} images (leave-one-out), gallery split {info['split_images']['gallery']}. "
             f"Models (small_cnn, in-process `fit`, batch 64): old [16, 32, 64] 64-d, first {s['old_classes']} training "
             f"classes, {s['old_steps']} steps; new [32, 64, 128] 64-d, all training classes, {s['new_steps']} steps; side "
             f"[16, 32] 32-d, self-supervised (augmented views), {s['side_steps']} steps. h: branch {s['branch_width']}, "
             f"trunk {s['trunk_width']}, {s['h_steps']} steps of {s['h_batch']}, FastFill loss (uncertainty, "
             "lambda_c 1), trained on the training split's embeddings; seed = model init, batch order and h's seed.", "",
             "## Retrieval on held-out classes (leave-one-out, eval split), MAP@R / Recall@1", "",
             "| seed | floor (raw pixels) | " + " | ".join(SETTINGS) + " |", "|---|---:|" + "---:|" * len(SETTINGS)]
    for r in res["seeds"]:
        lines.append(f"| {r['seed']} | {fl} | " + " | ".join(
            f"{r['metrics'][n]['map_at_r']:.4f} / {r['metrics'][n]['recall_at_1']:.4f}" for n in SETTINGS) + " |")
    mm = summ["metrics_mean"]
    lines.append(f"| mean | {fl} | " + " | ".join(f"{mm[n]['map_at_r']:.4f} / {mm[n]['recall_at_1']:.4f}"
                                                    for n in SETTINGS) + " |")
    lines += ["", "## Gap closed = (M(new,h) - M(old,old)) / (M(new,new) - M(old,old))", "",
              "| seed | floor MAP@R / R@1 | h(old) MAP@R | h(old) R@1 | h(old,side) MAP@R | h(old,side) R@1 | "
              "h train MSE (plain / side) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["seeds"]:
        g = r["gap_closed"]
        lines.append(f"| {r['seed']} | {fl} | {pct(g['new/h(old)']['map_at_r'])} | {pct(g['new/h(old)']['recall_at_1'])} | "
                     f"{pct(g['new/h(old,side)']['map_at_r'])} | {pct(g['new/h(old,side)']['recall_at_1'])} | "
                     f"{r['h']['plain']['mse_train']} / {r['h']['side']['mse_train']} |")
    g = summ["gap_closed_mean"]
    lines.append(f"| mean | {fl} | {pct(g['new/h(old)']['map_at_r'])} | {pct(g['new/h(old)']['recall_at_1'])} | "
                 f"{pct(g['new/h(old,side)']['map_at_r'])} | {pct(g['new/h(old,side)']['recall_at_1'])} | |")
    lines += ["", "## Backfill curve (side-info h, MAP@R, leave-one-out): area = mean of the 21 points", "",
              "| seed | floor MAP@R | random | uncertainty | oracle | uncertainty - random | "
              "Spearman(s, ||h - new||) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["seeds"]:
        c = r["curves"]
        lines.append(f"| {r['seed']} | {floor['map_at_r']:.4f} | {c['random']['area']:.4f} | "
                     f"{c['uncertainty']['area']:.4f} | {c['oracle']['area']:.4f} | {r['uncertainty_minus_random']:+.4f} | "
                     f"{r['log_var_distance_spearman']:.3f} |")
    d, cm = summ["uncertainty_minus_random"], summ["curve_mean"]
    lines += [f"| mean | {floor['map_at_r']:.4f} | {cm['random']:.4f} | {cm['uncertainty']:.4f} | {cm['oracle']:.4f} | "
              f"{d['mean']:+.4f} (min {d['min']:+.4f}, max {d['max']:+.4f} over seeds) | |", "",
              "Curve points, mean over seeds (fraction of the gallery re-embedded with the new model):", "",
              "| f | floor | random | uncertainty | oracle |", "|---:|---:|---:|---:|---:|"]
    fracs = res["seeds"][0]["curves"]["random"]["fractions"]
    for j, fr in enumerate(fracs):
        v = {k: np.mean([r["curves"][k]["values"][j] for r in res["seeds"]]) for k in ORDERS}
        lines.append(f"| {fr:.2f} | {floor['map_at_r']:.4f} | {v['random']:.4f} | {v['uncertainty']:.4f} | "
                     f"{v['oracle']:.4f} |")
    c = res["seeds"][0]["cost"]
    lines += ["", f"## Cost (seed {res['seeds'][0]['seed']}, one run, {c['torch_threads']} torch threads, this process)",
              "", "| path | items/s | vs re-embedding | floor MAP@R |", "|---|---:|---:|---:|",
              f"| re-embed the gallery split's {c['gallery_items']} images with new (read, decode, forward) | "
              f"{c['reembed_items_per_s']} | 1 | {floor['map_at_r']:.4f} |",
              f"| h(old) of the stored old embeddings | {c['transform_plain_items_per_s']} | {c['ratio_plain']}x | "
              f"{floor['map_at_r']:.4f} |",
              f"| h(old, side) of the stored old + side embeddings | {c['transform_side_items_per_s']} | "
              f"{c['ratio_side']}x | {floor['map_at_r']:.4f} |", "",
              "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summ["checks"].items()) + ".", "",
              "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in summ["goals"].items()) + ".", "",
              "Interval of uncertainty - random: min and max of the per-seed paired differences (same models, same h, "
              "same queries; only the order differs). Oracle order needs the new embeddings: an upper reference only."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="a tiny setting for a smoke run (not a measurement)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a setting ({', '.join(FULL)})")
    ap.add_argument("--out", default=os.path.join(RESULTS, "backfill_paths"))
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in settings:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(settings)}")
        settings[key] = int(value) if value.isdigit() else float(value)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    res = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO),
                                                                     *(argv or sys.argv[1:])]),
           "machine": f"{os.cpu_count()} CPUs ({platform.platform()})", "torch": torch.__version__,
           "load_before": [round(x, 2) for x in os.getloadavg()], "settings": settings, "seeds": []}
    with tempfile.TemporaryDirectory(prefix="dml-backfill-paths-") as work:
        data = shard(work, settings)
        res["dataset"], res["floor"] = data["info"], data["floor"]
        print(json.dumps({"dataset": data["info"], "floor": data["floor"]}), flush=True)
        for i, seed in enumerate(args.seeds):
            res["seeds"].append(one_seed(data, settings, seed, work, measure_cost=i == 0))
    res["summary"] = summarise(res["seeds"], res["floor"], res["dataset"])
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

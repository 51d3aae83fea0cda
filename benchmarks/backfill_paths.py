"""Backfill paths (METHODS 6.1) on the many-class glyph benchmark: serve the old gallery, transform it with
FCT's h (without and with side-info), backfill part of it in FastFill's order, or backfill it all.

    python benchmarks/backfill_paths.py [--seeds 0 1 2] [--quick]

One dataset (font_glyphs variant many, its first `max_classes` code points, sharded as configs/demo.yaml: the
held-out classes split into eval and gallery). Per seed, in this process (`loop.fit`, no Ray): an OLD model on
the first `old_classes` training classes, a NEW model (wider, longer, larger batches) on all of them, a small
SIDE-INFO model trained self-supervised; the training split embedded by the three; h trained on those
embeddings (`fit_transformation`) without and with side-info, both with FastFill's uncertainty. Evaluated
leave-one-out on the eval split (held-out classes): M(old,old), M(new,old), M(new,h(old)) for each h,
M(new,new) and the side model's own M(side,side), MAP@R and Recall@1, beside the raw-pixel floor; the gap
closed, (M(new,h) - M(old,old)) / (M(new,new) - M(old,old)); the backfill curve (21 points) and its area in
random, uncertainty and oracle order (the side-info h). Cost, once (the first seed): items/s of transforming
the gallery split's stored old (+ side) embeddings against re-embedding its images with the new model, in
this process with the same torch threads. `--set key=value` (JSON values) changes a setting of FULL.

Writes benchmarks/results/backfill_paths.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from dml_core.data.sources.base import ItemRef, Source, sha256_json  # noqa: E402
from dml_core.metrics.backfill_curve import ORDERS, backfill_curve, backfill_order  # noqa: E402
from dml_core.metrics.retrieval import evaluate_retrieval  # noqa: E402
from dml_core.training.embed import embed_split, load_checkpoint_model  # noqa: E402
from dml_core.training.loop import Worker, fit  # noqa: E402
from dml_core.training.state import CHECKPOINTS, checkpoint_dir_name  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
METRICS = ("map_at_r", "recall_at_1")
SETTINGS = ("old/old", "new/old", "new/h(old)", "new/h(old,side)", "new/new", "side/side")
TRANSFORMED = ("new/h(old)", "new/h(old,side)")
# open: the held-out classes (eval split, leave-one-out); closed: held-out images of the training classes
EVAL_SETS = {"open": "held-out classes", "closed": "held-out images of the training classes (FCT's setting)"}
THREADS = 2
SHARD_SEED = 1
# lambda_c 0: FastFill's point-to-cluster term pulls h(old) towards the training classes' prototypes, which the
# held-out classes evaluated here are not (a one-seed probe with a weaker old and new: new/h(old,side) MAP@R
# 0.364 with lambda_c 1, 0.455 with 0).
FULL = {"max_classes": 200, "image_size": 24, "eval_class_fraction": 0.3,
        "old_classes": 70, "old_steps": 300, "old_widths": [16, 32, 64],
        "new_steps": 600, "new_widths": [32, 64, 128], "new_batch": 128,
        "side_steps": 600, "side_widths": [32, 64], "side_dim": 32,
        "h_steps": 1500, "h_batch": 256, "branch_width": 128, "trunk_width": 512, "lambda_c": 0.0,
        "closed_fraction": 0.2}
QUICK = {**FULL, "max_classes": 40, "image_size": 16, "eval_class_fraction": 0.4, "old_classes": 16,
         "old_steps": 20, "new_steps": 30, "new_batch": 64, "side_steps": 10, "h_steps": 40, "h_batch": 128,
         "branch_width": 32, "trunk_width": 64}


class Subset(Source):
    """Some items of a source; with `split`, all of them in that split (the closed-set evaluation set)."""
    kind = "subset"

    def __init__(self, source: Source, refs: set[str], split: str | None = None) -> None:
        self.source, self.refs, self.split = source, refs, split

    def describe(self) -> dict:
        return {"kind": self.kind, "of": self.source.describe(), "items": len(self.refs), "split": self.split}

    def list_items(self) -> list[ItemRef]:
        return [dataclasses.replace(i, split=self.split) for i in self.source.list_items() if i.ref in self.refs]

    def load(self, item: ItemRef):
        return self.source.load(item)

    def fingerprint(self) -> str:
        return sha256_json([self.source.fingerprint(), sorted(self.refs), self.split])


def shard(work: str, s: dict) -> dict:
    """Two datasets of one glyph source: "glyphs-many" (training classes / held-out classes in eval and gallery)
    without `closed_fraction` of each training class's images, and "glyphs-closed", those images (FCT's
    setting: classes the new model trained on, images no model or h saw) in its eval split."""
    from dml_core.data.sharding import shard_dataset
    from dml_core.data.sources import FontGlyphSource
    from dml_core.data.splits import split_classes
    from dml_core.metrics.floor import pixel_floor

    t = time.perf_counter()
    src = FontGlyphSource(image_size=s["image_size"], variant="many", max_classes=s["max_classes"],
                          render_workers=THREADS)
    items = src.list_items()
    train_classes = set(split_classes([i.class_name for i in items], s["eval_class_fraction"], SHARD_SEED)[0])
    rng = np.random.default_rng(SHARD_SEED)
    closed = {i.ref for i in items if i.class_name in train_classes and rng.random() < s["closed_fraction"]}
    m = shard_dataset(Subset(src, {i.ref for i in items} - closed), work, "glyphs-many", seed=SHARD_SEED,
                      eval_class_fraction=s["eval_class_fraction"], gallery_fraction=0.5, max_shard_samples=5000)
    mc = shard_dataset(Subset(src, closed, split="eval"), work, "glyphs-closed", seed=SHARD_SEED,
                       max_shard_samples=5000)
    seconds = time.perf_counter() - t
    floors = {name: pixel_floor(man, "eval", image_size=s["image_size"], channels=1, ks=(1,), cache=False)
              for name, man in (("open", m), ("closed", mc))}
    info = {"name": m.name, "version": m.version, "classes": m.num_classes, "train_classes": m.num_train_classes,
            "held_out_classes": m.num_classes - m.num_train_classes, "closed_classes": mc.num_classes,
            "split_images": {**{k: v.count for k, v in m.splits.items()}, "closed": mc.splits["eval"].count},
            "shard_seconds": round(seconds, 1)}
    return {"manifest": m, "closed": mc, "root": work, "info": info,
            "floor": {name: {"map_at_r": f["map_at_r"], "recall_at_1": f["recall_at_k"]["1"]}
                      for name, f in floors.items()}}


def model_config(dataset: dict, name: str, seed: int, steps: int, model: dict, batch: int = 64,
                 **over) -> "Config":  # noqa: F821
    m = dataset["manifest"]
    raw = {"run": {"name": name, "root": dataset["root"]},
           "data": {"dataset": m.name, "version": m.version, "root": dataset["root"], "batch_size": batch,
                    "p": batch // 4, "k": 4},
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
                            {"image_size": size, "backbone_options": {"widths": s["old_widths"]}},
                            data={"train_classes": s["old_classes"]}),
        "new": model_config(data, f"new-{seed}", seed, s["new_steps"],
                            {"image_size": size, "backbone_options": {"widths": s["new_widths"]}}, s["new_batch"]),
        "side": model_config(data, f"side-{seed}", seed, s["side_steps"],
                             {"image_size": size, "embedding_dim": s["side_dim"],
                              "backbone_options": {"widths": s["side_widths"]}},
                             data={"p": None, "k": None, "augment": True}, loss={"objective": "self_supervised"}),
    }
    models, seconds = {}, {}
    for name, cfg in configs.items():
        t = time.perf_counter()
        fit(cfg, data["manifest"], Worker())
        seconds[f"train_{name}"] = round(time.perf_counter() - t, 1)
        final = os.path.join(cfg.run_dir, CHECKPOINTS, checkpoint_dir_name(cfg.train.steps))
        models[name] = load_checkpoint_model(final)
    return models, seconds


def embed_all(models: dict, sets: dict) -> dict:
    """{set: {model name: z, "labels": .., "ids": ..}} for `sets` {set: (manifest, split, model names)}, rows in
    the same (reader) order for every model."""
    out = {}
    for key, (manifest, split, names) in sets.items():
        row = {}
        for name in names:
            z, labels, ids = embed_split(models[name], manifest, split, batch_size=512)
            if "ids" in row and not torch.equal(row["ids"], ids):
                raise RuntimeError(f"{key}: models embedded the items in different orders")
            row.update({name: z, "labels": labels, "ids": ids})
        out[key] = row
    return out


def train_h(emb: dict, s: dict, seed: int, work: str, side: bool) -> tuple:
    from dml_core.models.transformation import load_transformation
    from dml_core.training.transformation import TransformationData, fit_transformation

    tr = emb["train"]
    t = TransformationSection(branch_width=s["branch_width"], trunk_width=s["trunk_width"], uncertainty=True,
                              lambda_c=s["lambda_c"], steps=s["h_steps"], batch_size=s["h_batch"],
                              checkpoint_every=s["h_steps"])
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
    t0 = time.perf_counter()
    models, seconds = train_models(data, s, seed)
    t = time.perf_counter()
    m = data["manifest"]
    sets = {"train": (m, "train", models), "open": (m, "eval", models), "closed": (data["closed"], "eval", models),
            **({"gallery": (m, "gallery", ("old", "side"))} if measure_cost else {})}
    emb = embed_all(models, sets)
    seconds["embed"] = round(time.perf_counter() - t, 1)
    hs, h_info = {}, {}
    for key in ("plain", "side"):
        t = time.perf_counter()
        hs[key], h_info[key] = train_h(emb, s, seed, work, side=key == "side")
        seconds[f"train_h_{key}"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out = {"seed": seed, **{key: evaluate(emb[key], hs, seed) for key in EVAL_SETS}, "h": h_info}
    seconds["evaluate"] = round(time.perf_counter() - t, 1)
    if measure_cost:
        out["cost"] = cost(hs, models["new"], emb["gallery"], data["manifest"])
    seconds["total"] = round(time.perf_counter() - t0, 1)
    out["seconds"] = seconds
    print(json.dumps({k: ({x: y for x, y in v.items() if x != "curves"} if k in EVAL_SETS else v)
                      for k, v in out.items()}), flush=True)
    return out


def evaluate(ev: dict, hs: dict, seed: int) -> dict:
    """The settings' metrics, the gap closed, and the side-info h's backfill curve in each order."""
    from dml_core.training.transformation import apply_transformation

    z_plain, _ = apply_transformation(hs["plain"], ev["old"])
    z_side, log_var = apply_transformation(hs["side"], ev["old"], ev["side"])
    galleries = {"old/old": ("old", ev["old"]), "new/old": ("new", ev["old"]), "new/h(old)": ("new", z_plain),
                 "new/h(old,side)": ("new", z_side), "new/new": ("new", ev["new"]), "side/side": ("side", ev["side"])}
    m = {name: scores(ev[q], g, ev["labels"]) for name, (q, g) in galleries.items()}
    orders = {kind: backfill_order(kind, ev["ids"].numpy(), log_var=log_var, new=ev["new"], transformed=z_side,
                                   seed=seed) for kind in ORDERS}
    curves = {kind: backfill_curve(ev["new"], ev["labels"], ev["new"], z_side, order, metric="map_at_r").to_dict()
              for kind, order in orders.items()}
    return {"metrics": m, "curves": curves,
            "gap_closed": {name: {k: gap_closed(m, name, k) for k in METRICS} for name in TRANSFORMED},
            "uncertainty_minus_random": curves["uncertainty"]["area"] - curves["random"]["area"],
            "log_var_distance_spearman": spearman(log_var.numpy(), (z_side - ev["new"]).norm(dim=1).numpy())}


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
    out = {key: summarise_set([r[key] for r in seeds]) for key in EVAL_SETS}
    new_new = {key: out[key]["metrics_mean"]["new/new"]["map_at_r"] for key in EVAL_SETS}
    closed, open_ = out["closed"], out["open"]
    out["checks"] = {
        "held-out classes >= 60": info["held_out_classes"] >= 60,
        "M(new,new) MAP@R <= 0.9 on both sets (room to move)": max(new_new.values()) <= 0.9,
        "M(old,old) above the floor (MAP@R) on both sets": all(
            r[key]["metrics"]["old/old"]["map_at_r"] > floor[key]["map_at_r"] for r in seeds for key in EVAL_SETS)}
    out["goals"] = {
        "gap closed >= 80% (MAP@R, side-info h, mean), held-out images of training classes":
            closed["gap_closed_mean"]["new/h(old,side)"]["map_at_r"] >= 0.8,
        "gap closed >= 80% (MAP@R, side-info h, mean), held-out classes":
            open_["gap_closed_mean"]["new/h(old,side)"]["map_at_r"] >= 0.8,
        "uncertainty area > random area (mean, both sets)":
            min(out[key]["uncertainty_minus_random"]["mean"] for key in EVAL_SETS) > 0,
        "transform / re-embed >= 20x": seeds[0]["cost"]["ratio_side"] >= 20}
    return out


def summarise_set(seeds: list[dict]) -> dict:
    """Means over the seeds of one evaluation set's results; the paired uncertainty - random areas."""
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    diffs = [r["uncertainty_minus_random"] for r in seeds]
    gap = {name: {k: mean([r["gap_closed"][name][k] for r in seeds if r["gap_closed"][name][k] is not None])
                  for k in METRICS} for name in TRANSFORMED}
    return {
        "metrics_mean": {name: {k: mean([r["metrics"][name][k] for r in seeds]) for k in METRICS} for name in SETTINGS},
        "gap_closed_mean": gap,
        "curve_mean": {kind: mean([r["curves"][kind]["area"] for r in seeds]) for kind in ORDERS},
        "uncertainty_minus_random": {"mean": mean(diffs), "min": min(diffs), "max": max(diffs),
                                     "seeds_positive": sum(d > 0 for d in diffs), "seeds": len(diffs)},
    }


def markdown(res: dict) -> str:
    per_set = [line for key in EVAL_SETS for line in (*_md_retrieval(res, key), *_md_curves(res, key))]
    return "\n".join([*_md_header(res), *per_set, *_md_cost(res)]) + "\n"


def _md_header(res: dict) -> list[str]:
    s, info = res["settings"], res["dataset"]
    return ["# Backfill paths: FCT transformation and FastFill order (glyphs, many)", "",
            f"Command: `{res['command']}`", "",
            f"Machine: {res['machine']}, torch {res['torch']}, {THREADS} torch threads; load average before "
            f"{res['load_before']}, after {res['load_after']}; wall {res['total_seconds']:.0f} s, process CPU "
            f"{res['cpu_seconds']:.0f} s.", "",
            f"Data: font_glyphs many, first {s['max_classes']} code points at {s['image_size']} px: {info['classes']} "
            f"classes ({info['train_classes']} training, {info['held_out_classes']} held out). Two evaluation sets, "
            f"every metric leave-one-out on it: the eval split, {info['split_images']['eval']} images of the "
            f"held-out classes; and {info['split_images']['closed']} images of the {info['closed_classes']} training "
            f"classes ({100 * s['closed_fraction']:.0f}% of each, drawn before sharding) that no model and no h "
            f"trained on, FCT's setting. Gallery split {info['split_images']['gallery']} (cost only). "
            f"Models (small_cnn, in-process `fit`, InfoNCE tau 0.1): old {s['old_widths']} 64-d, first "
            f"{s['old_classes']} training classes, {s['old_steps']} steps of 64; new {s['new_widths']} 64-d, all "
            f"training classes, {s['new_steps']} steps of {s['new_batch']}; side {s['side_widths']} {s['side_dim']}-d, "
            f"self-supervised (two augmented views), {s['side_steps']} steps of 64. h: branch {s['branch_width']}, "
            f"trunk {s['trunk_width']}, {s['h_steps']} steps of {s['h_batch']}, FastFill's loss with uncertainty, "
            f"lambda_c {s['lambda_c']:g}, trained on the training split's embeddings. A seed sets every model's init "
            "and batch order, h's seed and the random order.", ""]


def _md_retrieval(res: dict, key: str) -> list[str]:
    floor, summ, seeds = res["floor"][key], res["summary"][key], [{"seed": r["seed"], **r[key]} for r in res["seeds"]]
    fl = f"{floor['map_at_r']:.4f} / {floor['recall_at_1']:.4f}"
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    both = lambda m: f"{m['map_at_r']:.4f} / {m['recall_at_1']:.4f}"  # noqa: E731
    lines = [f"## Retrieval on the {EVAL_SETS[key]}, MAP@R / Recall@1 (query model / gallery)", "",
             "| seed | floor (raw pixels) | " + " | ".join(SETTINGS) + " |", "|---|---:|" + "---:|" * len(SETTINGS)]
    lines += [f"| {r['seed']} | {fl} | " + " | ".join(both(r["metrics"][n]) for n in SETTINGS) + " |"
              for r in seeds]
    lines += [f"| mean | {fl} | " + " | ".join(both(summ["metrics_mean"][n]) for n in SETTINGS) + " |", "",
              "## Gap closed = (M(new,h) - M(old,old)) / (M(new,new) - M(old,old))", "",
              "| seed | floor MAP@R / R@1 | h(old): MAP@R | R@1 | h(old,side): MAP@R | R@1 | "
              "h train MSE plain / side |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [*seeds, {"seed": "mean", "gap_closed": summ["gap_closed_mean"]}]:
        g = r["gap_closed"]
        h = next((x["h"] for x in res["seeds"] if x["seed"] == r["seed"]), None)
        mse = f"{h['plain']['mse_train']} / {h['side']['mse_train']}" if h else ""
        lines.append(f"| {r['seed']} | {fl} | " + " | ".join(pct(g[n][k]) for n in TRANSFORMED for k in METRICS)
                     + f" | {mse} |")
    return lines + [""]


def _md_curves(res: dict, key: str) -> list[str]:
    floor, summ = res["floor"][key]["map_at_r"], res["summary"][key]
    seeds = [{"seed": r["seed"], **r[key]} for r in res["seeds"]]
    lines = [f"## Backfill curve of the side-info h on the {EVAL_SETS[key]} (MAP@R); area = mean of the 21 points",
             "",
             "| seed | floor MAP@R | random | uncertainty | oracle | uncertainty - random | "
             "Spearman(s, h-new distance) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in seeds:
        a = {k: r["curves"][k]["area"] for k in ORDERS}
        lines.append(f"| {r['seed']} | {floor:.4f} | {a['random']:.4f} | {a['uncertainty']:.4f} | {a['oracle']:.4f} | "
                     f"{r['uncertainty_minus_random']:+.4f} | {r['log_var_distance_spearman']:.3f} |")
    d, a = summ["uncertainty_minus_random"], summ["curve_mean"]
    lines += [f"| mean | {floor:.4f} | {a['random']:.4f} | {a['uncertainty']:.4f} | {a['oracle']:.4f} | "
              f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}] | |", "",
              "Interval: min and max over the seeds of the paired difference (same models, h and queries; only the "
              f"order differs); positive in {d['seeds_positive']} of {d['seeds']} seeds. The oracle order needs the "
              "new embeddings it would save computing: an upper reference only.", "",
              "Curve points, mean over the seeds (f: share of the gallery re-embedded with the new model):", "",
              "| f | floor | random | uncertainty | oracle |", "|---:|---:|---:|---:|---:|"]
    for j, f in enumerate(seeds[0]["curves"]["random"]["fractions"]):
        v = {k: np.mean([r["curves"][k]["values"][j] for r in seeds]) for k in ORDERS}
        lines.append(f"| {f:.2f} | {floor:.4f} | {v['random']:.4f} | {v['uncertainty']:.4f} | {v['oracle']:.4f} |")
    return lines + [""]


def _md_cost(res: dict) -> list[str]:
    c, floor, summ = res["seeds"][0]["cost"], res["floor"]["open"]["map_at_r"], res["summary"]
    return [f"## Cost (seed {res['seeds'][0]['seed']}, one run, {c['torch_threads']} torch threads, one process)", "",
            "| path | items/s | vs re-embedding | floor MAP@R |", "|---|---:|---:|---:|",
            f"| re-embed the gallery split's {c['gallery_items']} images with new (read, decode, forward) | "
            f"{c['reembed_items_per_s']} | 1 | {floor:.4f} |",
            f"| h(old) of the stored old embeddings | {c['transform_plain_items_per_s']} | {c['ratio_plain']}x | "
            f"{floor:.4f} |",
            f"| h(old, side) of the stored old + side embeddings | {c['transform_side_items_per_s']} | "
            f"{c['ratio_side']}x | {floor:.4f} |", "",
            "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summ["checks"].items()) + ".", "",
            "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in summ["goals"].items()) + "."]


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
        settings[key] = json.loads(value)
    torch.set_num_threads(THREADS)
    t0, cpu0 = time.perf_counter(), time.process_time()
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
    res["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # about 2x the wall time on an idle machine
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""The many-class glyph benchmark: build and shard the font-glyph "many" variant (glyph task and font task)
on local disk, and measure it: classes, images, fonts per class, build+shard time, shard sizes, the
open-world split, and the raw-pixel floor (leave-one-out Recall@1 and MAP@R on the eval split).

    python benchmarks/glyph_dataset.py [--image-size 32] [--workers 2] [--eval-class-fraction 0.25]

Writes benchmarks/results/glyph_dataset.json and .md. Build+shard time is one cold run of `shard_dataset`
(render in --workers processes, PNG encoding and tar writing in this one) on a fresh folder.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_core.data.sharding import shard_dataset  # noqa: E402
from dml_core.data.sources import FontGlyphSource  # noqa: E402
from dml_core.metrics.floor import pixel_floor  # noqa: E402


def bench_task(root: str, task: str, args) -> dict:
    src = FontGlyphSource(image_size=args.image_size, variant="many", task=task, render_workers=args.workers)
    t = time.perf_counter()
    m = shard_dataset(src, root, f"glyphs-{task}", eval_class_fraction=args.eval_class_fraction)
    seconds = time.perf_counter() - t
    shards = [s for split in m.splits.values() for s in split.shards]
    sizes = np.array([s.bytes for s in shards])
    per_class = collections.Counter(i.class_name for i in src.list_items())
    out = {"task": task, "classes": m.num_classes, "images": sum(s.count for s in m.splits.values()),
           "fonts": src.stats["fonts"], "build_shard_seconds": round(seconds, 1),
           "images_per_class": {"min": min(per_class.values()), "median": float(np.median(list(per_class.values()))),
                                "max": max(per_class.values())},
           "train_classes": m.num_train_classes, "held_out_classes": m.num_classes - m.num_train_classes,
           "split_images": {k: v.count for k, v in m.splits.items()},
           "shards": {"count": len(shards), "total_bytes": int(sizes.sum()), "bytes_per_shard_mean": int(sizes.mean()),
                      "bytes_per_shard_max": int(sizes.max())},
           "source_stats": src.stats, "dataset_version": m.version}
    if task == "glyph":
        fonts = collections.Counter(i.class_name for i in src.list_items() if "#aug" not in i.ref)
        out["fonts_per_class"] = {"min": min(fonts.values()), "median": float(np.median(list(fonts.values()))),
                                  "max": max(fonts.values())}
    t = time.perf_counter()
    floor = pixel_floor(m, "eval", ks=(1,), cache=False)
    out["floor_eval"] = {"recall_at_1": round(floor["recall_at_k"]["1"], 4), "map_at_r": round(floor["map_at_r"], 4),
                         "num_queries": floor["num_queries"], "seconds": round(time.perf_counter() - t, 1)}
    return out


def write_markdown(path: str, payload: dict, command: str) -> None:
    lines = ["# Glyph benchmark (font-glyph source, variant many)", "", f"Command: `{command}`", "",
             "| task | classes (train / held-out) | images | fonts | fonts per class min / median | "
             "build+shard s | shards (total MB) | raw-pixel floor R@1 / MAP@R (eval) |", "|---|---|---|---|---|---|---|---|"]
    for r in payload["tasks"].values():
        fpc = r.get("fonts_per_class")
        fpc = f"{fpc['min']} / {fpc['median']:g}" if fpc else "-"
        lines.append(f"| {r['task']} | {r['classes']} ({r['train_classes']} / {r['held_out_classes']}) | {r['images']:,} | "
                     f"{r['fonts']} | {fpc} | {r['build_shard_seconds']} | {r['shards']['count']} "
                     f"({r['shards']['total_bytes'] / 2**20:.0f}) | {r['floor_eval']['recall_at_1']:.3f} / "
                     f"{r['floor_eval']['map_at_r']:.3f} |")
    lines += ["", f"{payload['settings']['image_size']} px, {payload['settings']['workers']} render workers, "
              f"{payload['machine']['cpus']} CPUs (load average {payload['load_avg_start']} at the start); "
              "glyph task: class = code point; font task: class = font (held-out fonts)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="render processes")
    ap.add_argument("--eval-class-fraction", type=float, default=0.25)
    ap.add_argument("--tasks", default="glyph,font")
    ap.add_argument("--out", default="benchmarks/results/glyph_dataset")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    payload = {"command": command, "load_avg_start": round(os.getloadavg()[0], 2),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": vars(args), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="dml-glyphs-") as tmp:
        for task in args.tasks.split(","):
            payload["tasks"][task] = r = bench_task(tmp, task, args)
            print(json.dumps(r), flush=True)
    glyph = payload["tasks"].get("glyph")
    if glyph:  # the headline figures, from the glyph task
        payload.update({k: glyph[k] for k in ("classes", "images", "fonts_per_class", "build_shard_seconds",
                                              "train_classes", "held_out_classes", "shards", "floor_eval")})
    payload["load_avg_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    write_markdown(args.out + ".md", payload, command)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()

"""Experiment 3: backward compatibility (METHODS 3, 3.1, 6) on the font glyphs. An old small model that saw 250
training classes; new wider models on all 514 without BCT, with BCT, with BCT and PC; a second update on top
of the first against the same old model (a chain); a small query model made compatible with a large gallery
model (heterogeneous). Each is trained with `dml train` and evaluated with `dml evaluate --old`."""
from __future__ import annotations

from dml_core import storage
from experiments.common import Context, cell, mean_std, read_json, run_dir, table

WIDE = "model.backbone_options.widths=[32,64,128]"
ALL_CLASSES = "data.train_classes=null"
BCT = "{old_checkpoint: %s, lambda_bct: 3.0}"
PC = "loss.pc={lambda_pc: 3.0}"
NEW_STEPS = "train.steps=300"
# (arm, its runs' --set items given the checkpoints so far, the old model it is evaluated against)
ARMS = [
    ("new-plain", lambda c: [WIDE, ALL_CLASSES, NEW_STEPS], "old"),
    ("new-bct", lambda c: [WIDE, ALL_CLASSES, NEW_STEPS, "loss.bct=" + BCT % c["old"]], "old"),
    ("new-bct-pc", lambda c: [WIDE, ALL_CLASSES, NEW_STEPS, "loss.bct=" + BCT % c["old"], PC], "old"),
    ("chain", lambda c: [WIDE, ALL_CLASSES, "train.steps=150", f"train.init_checkpoint={c['new-bct']}",
                         "loss.bct=" + BCT % c["old"]], "old"),
    ("small-plain", lambda c: [ALL_CLASSES, NEW_STEPS], "new-plain"),
    ("small-bct", lambda c: [ALL_CLASSES, NEW_STEPS, "loss.bct=" + BCT % c["new-plain"]], "new-plain"),
]
EXTRA = [("chain", "new-bct")]  # also evaluated against the first update
TINY_ARMS = ("new-bct", "chain")  # tiny settings train these; the other arms' configs are only loaded
TINY = ["train.steps=3", "data.source.max_classes=60", "data.train_classes=20", "data.p=4", "data.batch_size=16",
        "train.log_every=1"]
METRICS = ("map_at_r", "recall_at_1")


def _train_and_checkpoint(ctx: Context, name: str, sets: list[str]) -> str:
    from tasks.train import newest_checkpoint_url

    ctx.dml("train", ctx.config("compat.yaml"), *_sets(ctx, name, sets))
    return newest_checkpoint_url(run_dir(ctx, name))


def _sets(ctx: Context, name: str, sets: list[str]) -> list[str]:
    items = [*(TINY if ctx.tiny else []), f"run.name={name}", *sets]
    if ctx.tiny:  # the arm's settings win over the tiny ones, but for the steps
        items = [i for i in items if not i.startswith("train.steps=")] + ["train.steps=3"]
    return [a for item in items for a in ("--set", item)]


def _evaluate(ctx: Context, name: str, sets: list[str], old: str) -> dict:
    ctx.dml("evaluate", ctx.config("compat.yaml"), "--old", old, *_sets(ctx, name, sets))
    return read_json(storage.join(run_dir(ctx, name), "evaluation", "metrics.json"))


def _row(metrics: dict) -> dict:
    row = {"nfr": metrics["nfr"], "nfi": metrics["nfi"], "relative_nfr": relative_nfr(metrics),
           "allowed": metrics["gate"]["allowed"], "floor_map_at_r": metrics["floor"]["map_at_r"]}
    for m in METRICS:
        c = metrics["compatibility"][m]
        row[m] = {k: c[k] for k in ("old_old", "new_new", "new_old", "criterion", "update_gain")}
    return row


def relative_nfr(metrics: dict) -> float | None:
    """Flips / the queries the served setting ((old,old) here) got right at top 1. NFR is flips / all queries
    with a relevant item, and Recall@1 averages over the same queries, so this is NFR / served Recall@1."""
    served = metrics["compatibility"]["recall_at_1"]["served"]
    return metrics["nfr"] / served if served else None


def run_seed(ctx: Context, seed: int) -> dict:
    from collections import defaultdict

    from dml_core.config import load_config, parse_overrides

    ckpt = defaultdict(lambda: "/not/trained/in/tiny/mode")
    ckpt["old"] = _train_and_checkpoint(ctx, f"old-s{seed}", [f"train.seed={seed}"])
    out = {}
    for arm, sets_of, old in ARMS:
        sets = [f"train.seed={seed}", *sets_of(ckpt)]
        if ctx.tiny and arm not in TINY_ARMS:
            load_config(ctx.config("compat.yaml"), parse_overrides(sets))  # a config that no longer loads fails
            continue
        ckpt[arm] = _train_and_checkpoint(ctx, f"{arm}-s{seed}", sets)
        out[f"{arm} vs {old}"] = _row(_evaluate(ctx, f"{arm}-s{seed}", sets, ckpt[old]))
        for extra_arm, extra_old in EXTRA:
            if extra_arm == arm:
                out[f"{arm} vs {extra_old}"] = _row(_evaluate(ctx, f"{arm}-s{seed}", sets, ckpt[extra_old]))
    return out


def summarise(per_seed: list[dict]) -> dict:
    summary = {}
    for pair in per_seed[0]:
        rows = [s[pair] for s in per_seed]
        summary[pair] = {"nfr": mean_std(r["nfr"] for r in rows), "nfi": mean_std(r["nfi"] for r in rows),
                         "relative_nfr": mean_std(r["relative_nfr"] for r in rows),
                         "floor_map_at_r": mean_std(r["floor_map_at_r"] for r in rows),
                         "allowed": sum(r["allowed"] for r in rows),
                         **{m: {k: mean_std(r[m][k] for r in rows) for k in ("old_old", "new_new", "new_old")}
                            for m in METRICS},
                         "criterion": {m: sum(bool(r[m]["criterion"]) for r in rows) for m in METRICS},
                         "update_gain": {m: mean_std(r[m]["update_gain"] for r in rows) for m in METRICS}}
    return summary


def run(ctx: Context) -> dict:
    ctx.dml("shard", ctx.config("compat.yaml"), *(a for item in (TINY if ctx.tiny else []) for a in ("--set", item)))
    per_seed = [run_seed(ctx, seed) for seed in range(ctx.seeds)]
    summary = summarise(per_seed)
    n = len(per_seed)
    rows = [[pair, cell(s["floor_map_at_r"]), cell(s["map_at_r"]["new_new"]), cell(s["map_at_r"]["new_old"]),
             cell(s["map_at_r"]["old_old"]),
             f"{s['criterion']['map_at_r']}/{n}", f"{s['criterion']['recall_at_1']}/{n}",
             cell(s["update_gain"]["map_at_r"]), cell(s["nfr"]), cell(s["relative_nfr"]), cell(s["nfi"]),
             f"{s['allowed']}/{n}"] for pair, s in summary.items()]
    md = ["# Experiment 3: backward-compatible training (font glyphs)", "",
          "Leave-one-out within the evaluation split. Criterion M(new,old) > M(old,old), counted in seeds, on MAP@R "
          "and on Recall@1. Update gain (MAP@R): (M(new,old) - M(old,old)) / (M(new,new) - M(old,old)), the new "
          "model its own reference, over the seeds where M(new,new) > M(old,old) (n=1: one seed). NFR: flips / all "
          "queries (with a relevant item); relative NFR: flips / the queries the old model got right (NFR / "
          "Recall@1(old,old)).", "",
          table(["new vs old", "floor MAP@R", "MAP@R(new,new)", "MAP@R(new,old)", "MAP@R(old,old)",
                 "criterion held (MAP@R)", "criterion held (R@1)", "update gain", "NFR", "relative NFR", "NFI",
                 "gate allowed"], rows)]
    return ctx.write("compat", {"per_seed": per_seed, "summary": summary}, "\n".join(md))

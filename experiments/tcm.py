"""Experiment 1: threshold consistency. InfoNCE with and without TCM (METHODS 2) on Fashion-MNIST and on the
font glyphs: Recall@1, MAP@R, OPIS, eps-OPIS over seeds; utility curves side by side; hard-pair counts over
training. "Without" is TCM with both weights 0 (InfoNCE's gradients, the counts still logged)."""
from __future__ import annotations

import numpy as np

from dml_core.config import load_config, parse_overrides
from dml_core.metrics.opis_result import OpisResult
from dml_core.metrics.utility_plot import utility_plots_png
from experiments.common import Context, cell, mean_std, sweep, table

ARMS = {"without TCM": "{lambda_pos: 0, lambda_neg: 0}", "with TCM": "{lambda_pos: 1, lambda_neg: 1}"}
DATASETS = {"fmnist": "tcm_fmnist.yaml", "fonts": "tcm_fonts.yaml"}
METRICS = (("Recall@1", "recall_at_1"), ("floor R@1", "floor_recall_at_1"), ("MAP@R", "map_at_r"),
           ("floor MAP@R", "floor_map_at_r"), ("OPIS", "opis"), ("eps-OPIS", "eps_opis"))
TINY = ["train.steps=4", "train.log_every=2", "data.source.max_per_class=40"]
TINY_FONTS = ["data.source.max_classes=40", "data.p=8", "data.batch_size=32"]  # tiny mode only loads this config


def arm_of(row: dict) -> str:
    weights = row["values"]["loss.tcm"]
    return "with TCM" if weights["lambda_pos"] or weights["lambda_neg"] else "without TCM"


def hard_pairs(rows: list[dict]) -> dict:
    """Per arm: the steps and the mean over seeds of the hard positive and hard negative pair counts."""
    out = {}
    for arm in ARMS:
        runs = [{m["step"]: m for m in r["metrics"] if "step" in m and "event" not in m}
                for r in rows if arm_of(r) == arm]
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        series = {kind: np.mean([[run[s][f"tcm/{kind}"] for s in steps] for run in runs], axis=0).tolist()
                  for kind in ("hard_pos", "hard_neg")}
        out[arm] = {"steps": steps, **series}
    return out


def _plot_hard_pairs(curves: dict, path: str, title: str, window: int = 10) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    for i, (kind, label) in enumerate((("hard_pos", "hard positive pairs (s <= m_pos)"),
                                       ("hard_neg", "hard negative pairs (s >= m_neg)")), start=1):
        ax = fig.add_subplot(1, 2, i)
        for arm, c in curves.items():
            y = np.convolve(c[kind], np.ones(window) / window, mode="valid") if len(c[kind]) >= window else c[kind]
            ax.plot(c["steps"][len(c["steps"]) - len(y):], y, label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{label}, per global batch")
        ax.set_title(f"{title}: {label.split(' (')[0]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(ctx: Context) -> dict:
    grid = ["loss.tcm=" + ",".join(ARMS.values())]
    result, md = {"datasets": {}}, ["# Experiment 1: threshold consistency (TCM)", ""]
    for name, config in DATASETS.items():
        if ctx.tiny and name == "fonts":  # a config that no longer loads fails; the fmnist sweep runs the code
            load_config(ctx.config(config), parse_overrides(TINY_FONTS))
            continue
        rows = sweep(ctx, config, f"tcm-{name}", grid, TINY if ctx.tiny else [])
        summary = {arm: {key: mean_std(r[key] for r in rows if arm_of(r) == arm) for _, key in METRICS}
                   for arm in ARMS}
        first = {arm: next(r for r in rows if arm_of(r) == arm) for arm in ARMS}
        curves_png = ctx.path(f"tcm_{name}_utility.png")
        with open(curves_png, "wb") as f:
            f.write(utility_plots_png([OpisResult.from_dict(first[a]["report"]["opis"]) for a in ARMS],
                                      [f"{name}, {a} (seed {first[a]['seed']})" for a in ARMS]))
        curves = hard_pairs(rows)
        _plot_hard_pairs(curves, ctx.path(f"tcm_{name}_hard_pairs.png"), name)
        opis_off, opis_on = (summary[a]["opis"]["mean"] for a in ARMS)
        result["datasets"][name] = {
            "trials": [{k: r[k] for k in ("trial", "run", "seed", "values", *(m for _, m in METRICS))} for r in rows],
            "summary": summary, "opis_change": (opis_on - opis_off) / opis_off if opis_off else None,
            "hard_pairs": curves, "plots": [f"tcm_{name}_utility.png", f"tcm_{name}_hard_pairs.png"]}
        md += [f"## {name}", "", table(["arm", "seeds", *(h for h, _ in METRICS)],
                                      [[arm, str(summary[arm]["opis"]["n"]), *(cell(summary[arm][k]) for _, k in METRICS)]
                                       for arm in ARMS])]
    return ctx.write("tcm", result, "\n".join(md))

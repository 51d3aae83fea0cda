"""Experiment 2: batch size. The decomposable loss (METHODS 1.5) against InfoNCE, self-supervised, at global
batch 32-512 with the default gamma: Recall@1 against batch size, one curve per loss."""
from __future__ import annotations

from experiments.common import Context, cell, mean_std, sweep, table

LOSSES = ("info_nce", "decomposable")
BATCHES = (32, 64, 128, 256, 512)
TINY_BATCHES = (16,)
TINY = ["train.steps=3", "train.log_every=1", "data.source.max_per_class=40"]


def _plot(summary: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for loss, points in summary.items():
        b = sorted(points, key=int)
        ax.errorbar([int(x) for x in b], [points[x]["mean"] for x in b], yerr=[points[x]["std"] for x in b],
                    marker="o", capsize=3, label=loss)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images; two views each)")
    ax.set_ylabel("Recall@1 on held-out classes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def b_vs_2b(summary: dict, batches) -> list[dict]:
    """The claim's comparison: mean Recall@1 of the decomposable loss at b, InfoNCE at 2b (and at b)."""
    mean = {loss: {int(b): point["mean"] for b, point in points.items()} for loss, points in summary.items()}
    return [{"b": b, "decomposable": mean["decomposable"][b], "info_nce_2b": mean["info_nce"][2 * b],
             "info_nce_b": mean["info_nce"][b]} for b in batches if 2 * b in batches]


def run(ctx: Context) -> dict:
    batches = TINY_BATCHES if ctx.tiny else BATCHES
    grid = ["loss.base=" + ",".join(LOSSES), "data.batch_size=" + ",".join(map(str, batches))]
    rows = sweep(ctx, "batch_size.yaml", "batch-size", grid, TINY if ctx.tiny else [])
    summary = {loss: {str(b): mean_std(r["recall_at_1"] for r in rows if r["values"]["loss.base"] == loss
                                       and r["values"]["data.batch_size"] == b) for b in batches}
               for loss in LOSSES}
    _plot(summary, ctx.path("batch_size_recall.png"))
    pairs = b_vs_2b(summary, batches)
    md = ["# Experiment 2: batch size (decomposable loss vs InfoNCE, self-supervised)", "",
          table(["global batch", *LOSSES], [[str(b), *(cell(summary[l][str(b)]) for l in LOSSES)] for b in batches])]
    return ctx.write("batch_size", {"trials": [{k: r[k] for k in ("trial", "run", "seed", "values", "recall_at_1",
                                                                  "map_at_r")} for r in rows],
                                    "recall_at_1": summary, "b_vs_2b": pairs, "plots": ["batch_size_recall.png"]},
                     "\n".join(md))

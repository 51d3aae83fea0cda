"""PNG of per-class utility-vs-threshold curves, as in the published OPIS figure.

One thin translucent line per class, the pooled utility bold on top, the calibration range shaded.
Uses matplotlib's Agg canvas directly, so the global backend of the caller is left untouched.
"""
from __future__ import annotations

import io

import numpy as np

from dml_core.metrics.opis_result import OpisResult


def utility_plot_png(result: OpisResult, title: str | None = None, max_classes: int = 2000, seed: int = 0,
                     dpi: int = 120) -> bytes:
    """Render the curves of `result` to PNG bytes (at most `max_classes` class lines, chosen at random)."""
    return utility_plots_png([result], [title], max_classes, seed, dpi)


def utility_plots_png(results: list[OpisResult], titles: list[str | None], max_classes: int = 2000, seed: int = 0,
                      dpi: int = 120) -> bytes:
    """The curves of several results side by side on one shared y axis (e.g. without and with TCM)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: importing matplotlib costs 0.2 s
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7 * len(results), 4.5))
    FigureCanvasAgg(fig)
    for i, (result, title) in enumerate(zip(results, titles), start=1):
        _draw(fig.add_subplot(1, len(results), i), result, title, max_classes, seed)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _draw(ax, result: OpisResult, title: str | None, max_classes: int, seed: int) -> None:
    if result.plot_thresholds is not None and len(result.plot_thresholds) > 1:
        t, cu, pu = result.plot_thresholds, result.plot_class_utility, result.plot_pooled_utility
    elif result.thresholds is not None:
        t, cu, pu = result.thresholds, result.class_utility, result.pooled_utility
    else:
        raise ValueError("this OpisResult carries no curves (was it loaded without include_curves?)")
    shown = np.arange(cu.shape[0])
    if len(shown) > max_classes:
        shown = np.sort(np.random.default_rng(seed).choice(shown, max_classes, replace=False))
    alpha = float(np.clip(8.0 / np.sqrt(max(len(shown), 1)), 0.05, 0.6))
    for i in shown:
        ax.plot(t, cu[i], color="tab:blue", linewidth=0.6, alpha=alpha)
    ax.plot([], [], color="tab:blue", linewidth=0.8, label=f"per class ({cu.shape[0]} classes"
            + (f", {len(shown)} drawn)" if len(shown) < cu.shape[0] else ")"))
    ax.plot(t, pu, color="black", linewidth=2.5, label="pooled (all pairs)")
    ax.axvspan(result.t_lo, result.t_hi, color="tab:orange", alpha=0.15,
               label=f"calibration range (FAR {result.far_lo:g} to {result.far_hi:g})")
    for x in (result.t_lo, result.t_hi):
        ax.axvline(x, color="tab:orange", linewidth=1.0, linestyle="--")
    ax.set_xlim(float(t[0]), float(t[-1]))
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("distance threshold t  (accept pair if d <= t)")
    ax.set_ylabel(f"utility  F$_{{\\beta}}$(TAR, TRR),  $\\beta$={result.beta:g}")
    head = title + "\n" if title else ""
    ax.set_title(f"{head}OPIS = {result.opis:.4g},  {result.eps:g}-OPIS = {result.eps_opis:.4g}  ({result.method})",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)


def save_utility_plot(result: OpisResult, url: str, **kwargs) -> str:
    """Write the PNG atomically to a local path or s3:// URL; returns the URL."""
    from dml_core.storage import write_bytes_atomic

    write_bytes_atomic(url, utility_plot_png(result, **kwargs))
    return url

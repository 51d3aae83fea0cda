"""Run the whole evaluation of one embedded evaluation set and bundle it into an `EvaluationReport`."""
from __future__ import annotations

from dml_core.metrics.compatibility import evaluate_compatibility
from dml_core.metrics.gate import UpdateGate
from dml_core.metrics.opis import opis
from dml_core.metrics.report import EvaluationReport
from dml_core.metrics.retrieval import evaluate_retrieval
from dml_core.metrics.utility_plot import save_utility_plot


def evaluate_embeddings(z, labels, *, ks=(1, 5), old_z=None, ref_z=None, opis_kwargs: dict | None = None,
                        gate: UpdateGate | None = None, plot_url: str | None = None, backend: str = "auto",
                        use_gpu: bool = False, meta: dict | None = None) -> EvaluationReport:
    """Leave-one-out retrieval metrics and OPIS of `z` (the new model); with `old_z` (same items, old model)
    also compatibility and the gate decision. `opis_kwargs` go to `opis` (e.g. max_neg_per_class)."""
    retrieval = evaluate_retrieval(z, labels, ks=ks, backend=backend, use_gpu=use_gpu)
    opis_result = opis(z, labels, **(opis_kwargs or {}))
    report = EvaluationReport(retrieval=retrieval, opis=opis_result, meta=dict(meta or {}))
    if plot_url:
        report.plots["utility"] = save_utility_plot(opis_result, plot_url)
    if old_z is not None:
        report.compatibility = evaluate_compatibility(old_z, z, labels, ref_query=ref_z, backend=backend,
                                                      use_gpu=use_gpu)
        report.gate = (gate or UpdateGate()).decide(report.compatibility)
    return report

"""Run the whole evaluation of one embedded evaluation set and bundle it into an `EvaluationReport`."""
from __future__ import annotations

from dml_core.metrics.compatibility import CompatibilityResult, evaluate_compatibility, metric_value
from dml_core.metrics.floor import floor_score
from dml_core.metrics.gate import GateDecision, UpdateGate
from dml_core.metrics.opis import opis
from dml_core.metrics.report import EvaluationReport
from dml_core.metrics.retrieval import evaluate_retrieval
from dml_core.metrics.utility_plot import save_utility_plot


def evaluate_embeddings(z, labels, *, ks=(1, 5), old_z=None, served_z=None, ref_z=None, transformed_z=None,
                        floor: dict | None = None, opis_kwargs: dict | None = None, gate: UpdateGate | None = None,
                        plot_url: str | None = None, backend: str = "auto", use_gpu: bool = False,
                        meta: dict | None = None) -> EvaluationReport:
    """Leave-one-out retrieval metrics and OPIS of `z` (the new model), the gate decision (METHODS 6) and,
    with `old_z` (same items, the gallery model), compatibility. `served_z`: the served query model's
    embeddings in a chain. `transformed_z`: h(old) of the same items (rows aligned with `z`), for the
    transformed-gallery setting. `floor`: the raw-pixel floor of the split (`pixel_floor`), reported beside the
    model and used by the gate. `opis_kwargs` go to `opis` (e.g. max_neg_per_class)."""
    retrieval = evaluate_retrieval(z, labels, ks=tuple(sorted({1, *ks})), backend=backend, use_gpu=use_gpu)
    opis_result = opis(z, labels, **(opis_kwargs or {}))
    report = EvaluationReport(retrieval=retrieval, opis=opis_result, floor=floor, meta=dict(meta or {}))
    if plot_url:
        report.plots["utility"] = save_utility_plot(opis_result, plot_url)
    report.compatibility, report.gate = decide_gate(z, labels, old_z=old_z, served_z=served_z, ref_z=ref_z,
                                                    transformed_z=transformed_z, floor=floor, gate=gate,
                                                    retrieval=retrieval, backend=backend, use_gpu=use_gpu)
    return report


def decide_gate(z, labels, *, old_z=None, served_z=None, ref_z=None, transformed_z=None,
                floor: dict | None = None, gate: UpdateGate | None = None, retrieval=None, backend: str = "auto",
                use_gpu: bool = False) -> tuple[CompatibilityResult | None, GateDecision]:
    """The gate (METHODS 6) of the new model's `z`: against the old gallery (`old_z`, and `served_z` in a
    chain, and its transformation `transformed_z` = h(old)) when there is one, else as the first model;
    (compatibility or None, decision). `retrieval`: the new model's own leave-one-out result, when the caller
    has it already."""
    gate = gate or UpdateGate()
    floor_value = None if floor is None else floor_score(floor, gate.metric)
    if old_z is None and transformed_z is not None:
        raise ValueError("transformed_z (h of the old embeddings) needs old_z")
    if old_z is None:
        retrieval = retrieval or evaluate_retrieval(z, labels, ks=(1,), backend=backend, use_gpu=use_gpu)
        return None, gate.first(metric_value(retrieval, gate.metric), floor_value)
    compat = evaluate_compatibility(old_z, z, labels, ref_query=ref_z, served_query=served_z,
                                    transformed_gallery=transformed_z, backend=backend, use_gpu=use_gpu)
    return compat, gate.decide(compat, floor_value)

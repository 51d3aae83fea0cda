"""Compatibility between model versions (METHODS 6): cross-model matrix, criterion, update gain, flips.

Inputs are embeddings of the same evaluation items by the old and the new model (and optionally by a
reference model trained without the compatibility term):
- leave-one-out (default): every item queries all other items; for M(q, g) the query is embedded by
  model q and the other items by model g, the item itself is excluded;
- query/gallery split: pass `old_gallery`, `new_gallery` (and `ref_gallery` with a ref model) and
  `gallery_labels`; the `*_query` arrays then hold the queries.
With `transformed_gallery` (h(old) of the gallery items, METHODS 6.1) M(new, h(old)) and its flips are added.
Negative flips and NFR/NFI count only queries with a relevant gallery item (those Recall@1 averages over).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dml_core.metrics.retrieval import RetrievalResult, evaluate_retrieval

METRICS = ("recall_at_1", "map_at_r")
# Comparisons at a threshold (METHODS 6): a difference within this of the threshold counts as on it, so
# 29/100 - 28/100 >= 0.01 holds although it is 0.01 - 4.7e-17 in floating point.
THRESHOLD_TOLERANCE = 1e-9


def metric_value(result: RetrievalResult, metric: str) -> float:
    """One of METRICS from a retrieval result."""
    return result.map_at_r if metric == "map_at_r" else result.recall[1]


@dataclass
class CrossModelScores:
    """One metric under each (query model, gallery model) setting."""

    metric: str
    old_old: float
    new_new: float
    new_old: float
    ref_ref: float | None  # None when no reference model was given (then new_new is the reference)
    ref_model: str  # "ref" or "new": whose self-score the update gain divides by
    criterion: bool  # M(new,old) > M(old,old) (by more than THRESHOLD_TOLERANCE)
    update_gain: float | None  # None when M(ref,ref) <= M(old,old): no improvement to share
    update_gain_reason: str | None = None  # why update_gain is None (None when it is a number)
    served: float | None = None  # M(served query model, old) in a chain; None: what is served is (old,old)
    new_transformed: float | None = None  # M(new, h(old)); None when no transformation h was given

    @property
    def served_score(self) -> float:
        """The metric of what users get today: M(old,old), or M(query model, old) in a chain."""
        return self.old_old if self.served is None else self.served

    @property
    def served_setting(self) -> str:
        return "(old,old)" if self.served is None else "(served query model,old)"

    @classmethod
    def build(cls, metric, old_old, new_new, new_old, ref_ref=None, served=None, new_transformed=None):
        ref_model, ref_score = ("ref", ref_ref) if ref_ref is not None else ("new", new_new)
        gain, reason = update_gain(metric, old_old, new_old, ref_score, ref_model)
        criterion = new_old - old_old > THRESHOLD_TOLERANCE
        return cls(metric, old_old, new_new, new_old, ref_ref, ref_model, criterion, gain, reason, served,
                   new_transformed)


def update_gain(metric: str, old_old: float, new_old: float, ref_ref: float,
                ref_model: str = "ref") -> tuple[float | None, str | None]:
    """(gain, None) with gain = (M(new,old) - M(old,old)) / (M(ref,ref) - M(old,old)) (METHODS 6), or
    (None, reason) when M(ref,ref) <= M(old,old) (within THRESHOLD_TOLERANCE): no improvement to share."""
    den = ref_ref - old_old
    if den <= THRESHOLD_TOLERANCE:
        return None, (f"{metric}({ref_model},{ref_model}) = {ref_ref:.6g} <= {metric}(old,old) = {old_old:.6g}: "
                      f"the {ref_model} model does not improve on the old one, so there is no improvement to share")
    return (new_old - old_old) / den, None


@dataclass
class NegativeFlips:
    """Queries right (top-1) under what is served ((old,old), or the chain's served setting) and wrong under
    `setting`."""

    setting: str  # "new_old", "new_new" or "new_transformed"
    flips: int
    queries: int
    wrong: int  # queries wrong under the setting
    nfr: float  # flips / queries
    nfi: float  # flips / wrong (0 when nothing is wrong)

    @classmethod
    def count(cls, setting: str, old_correct: np.ndarray, new_correct: np.ndarray, valid: np.ndarray):
        flips = int((old_correct & ~new_correct & valid).sum())
        queries = int(valid.sum())
        wrong = int((~new_correct & valid).sum())
        return cls(setting, flips, queries, wrong, flips / queries, flips / wrong if wrong else 0.0)


@dataclass
class CompatibilityResult:
    mode: str
    num_queries: int
    scores: dict[str, CrossModelScores] = field(default_factory=dict)
    flips: dict[str, NegativeFlips] = field(default_factory=dict)

    @property
    def ref_model(self) -> str:
        return next(iter(self.scores.values())).ref_model

    def summary(self) -> dict:
        """Each metric's criterion with M(new,old) and M(old,old), next to NFR and NFI of (new,old) and
        (new,new): the effect of a compatibility term (BCT, PC) in one place."""
        out: dict = {}
        for metric, s in self.scores.items():
            out[metric] = {"criterion": s.criterion, "new_old": s.new_old, "old_old": s.old_old}
            if s.new_transformed is not None:
                out[metric]["new_transformed"] = s.new_transformed
        for setting, f in self.flips.items():
            out[f"nfr_{setting}"], out[f"nfi_{setting}"] = f.nfr, f.nfi
        return out

    def to_dict(self) -> dict:
        return {"mode": self.mode, "num_queries": self.num_queries, "ref_model": self.ref_model,
                "summary": self.summary(),
                "scores": {k: asdict(v) for k, v in self.scores.items()},
                "flips": {k: asdict(v) for k, v in self.flips.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "CompatibilityResult":
        return cls(mode=d["mode"], num_queries=int(d["num_queries"]),  # "summary" is derived: recomputed
                   scores={k: CrossModelScores(**v) for k, v in d["scores"].items()},
                   flips={k: NegativeFlips(**v) for k, v in d["flips"].items()})


def evaluate_compatibility(old_query, new_query, query_labels, *, old_gallery=None, new_gallery=None,
                           gallery_labels=None, ref_query=None, ref_gallery=None, served_query=None,
                           transformed_gallery=None, backend: str = "auto",
                           use_gpu: bool = False) -> CompatibilityResult:
    """Cross-model Recall@1 and MAP@R, the BCT criterion, update gain and negative flips. `served_query`: in a
    chain, the queries embedded by the served query model (not the gallery model); the served score and the
    flips then count against (served query model, old gallery) (METHODS 6). `transformed_gallery`: h(old) of the
    gallery items (leave-one-out: of the query items, rows aligned), for M(new, h(old)) and its flips."""
    split = old_gallery is not None or new_gallery is not None or gallery_labels is not None
    if split and (old_gallery is None or new_gallery is None or gallery_labels is None):
        raise ValueError("a query/gallery split needs old_gallery, new_gallery and gallery_labels together")
    if split and ref_query is not None and ref_gallery is None:
        raise ValueError("ref_query given with a query/gallery split but no ref_gallery")
    kw = dict(backend=backend, use_gpu=use_gpu)

    def run(q, g) -> RetrievalResult:
        if split:
            return evaluate_retrieval(q, query_labels, ks=(1,), gallery_z=g, gallery_labels=gallery_labels,
                                      exclude_self=False, **kw)
        return evaluate_retrieval(q, query_labels, ks=(1,), gallery_z=g, gallery_labels=query_labels,
                                  exclude_self=True, **kw)

    g_old = old_gallery if split else old_query
    g_new = new_gallery if split else new_query
    oo, nn, no = run(old_query, g_old), run(new_query, g_new), run(new_query, g_old)
    rr = run(ref_query, ref_gallery if split else ref_query) if ref_query is not None else None
    ss = run(served_query, g_old) if served_query is not None else None
    nt = run(new_query, transformed_gallery) if transformed_gallery is not None else None
    scores = {}
    for metric in METRICS:
        def get(r):
            return metric_value(r, metric) if r is not None else None
        scores[metric] = CrossModelScores.build(metric, get(oo), get(nn), get(no), get(rr), get(ss), get(nt))
    today = ss or oo
    flips = {"new_old": NegativeFlips.count("new_old", today.top1_correct, no.top1_correct, today.valid),
             "new_new": NegativeFlips.count("new_new", today.top1_correct, nn.top1_correct, today.valid)}
    if nt is not None:
        flips["new_transformed"] = NegativeFlips.count("new_transformed", today.top1_correct, nt.top1_correct,
                                                       today.valid)
    return CompatibilityResult(mode=oo.mode, num_queries=oo.num_queries, scores=scores, flips=flips)

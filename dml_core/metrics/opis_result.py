"""The result of an OPIS evaluation: a dataclass that is also a read-only mapping (result["opis"])."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np

# Arrays left out of to_dict() unless include_curves=True (they grow with classes x thresholds).
CURVE_FIELDS = ("thresholds", "class_utility", "pooled_utility", "pooled_tar", "pooled_trr", "class_mean_utility",
                "class_pos_pairs", "class_neg_pairs", "plot_thresholds", "plot_class_utility", "plot_pooled_utility")


@dataclass
class OpisResult(Mapping):
    opis: float
    eps_opis: float
    method: str  # "exact" or "sampled"
    beta: float
    eps: float
    far_lo: float
    far_hi: float
    num_thresholds: int
    t_lo: float
    t_hi: float
    num_items: int
    num_classes: int  # evaluated classes (>= 2 items)
    num_skipped_classes: int
    num_pos_pairs: int  # unordered pairs in the set (all positives, also in the sampled path)
    num_neg_pairs: int  # unordered negative pairs in the set (not the sample size)
    class_labels: list = field(default_factory=list)
    worst_classes: list = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    sampling: dict | None = None
    plot_extend: float = 0.0
    thresholds: np.ndarray = field(default=None, repr=False)
    class_utility: np.ndarray = field(default=None, repr=False)  # (C, K), rows in class_labels order
    pooled_utility: np.ndarray = field(default=None, repr=False)  # (K,)
    pooled_tar: np.ndarray = field(default=None, repr=False)
    pooled_trr: np.ndarray = field(default=None, repr=False)
    class_mean_utility: np.ndarray = field(default=None, repr=False)
    class_pos_pairs: np.ndarray = field(default=None, repr=False)
    class_neg_pairs: np.ndarray = field(default=None, repr=False)  # all negatives of the class (population)
    plot_thresholds: np.ndarray = field(default=None, repr=False)
    plot_class_utility: np.ndarray = field(default=None, repr=False)
    plot_pooled_utility: np.ndarray = field(default=None, repr=False)

    def __getitem__(self, key):
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    @classmethod
    def _names(cls):
        return [f.name for f in fields(cls)]

    def to_dict(self, include_curves: bool = False) -> dict:
        """JSON-ready dict; the per-threshold arrays only when `include_curves`."""
        out = {}
        for name in self._names():
            if name in CURVE_FIELDS and not include_curves:
                continue
            out[name] = _plain(getattr(self, name))
        return out

    def to_json(self, include_curves: bool = False, **kwargs) -> str:
        return json.dumps(self.to_dict(include_curves), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "OpisResult":
        kw = {k: v for k, v in d.items() if k in cls._names()}
        for name in CURVE_FIELDS:
            if kw.get(name) is not None:
                kw[name] = np.asarray(kw[name])
        if kw.get("sampling"):
            kw["sampling"] = {k: np.asarray(v) if isinstance(v, list) else v for k, v in kw["sampling"].items()}
        return cls(**kw)


def _plain(v, include_arrays: bool = True):
    """NumPy values to JSON-ready Python values (recursively for dicts)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v

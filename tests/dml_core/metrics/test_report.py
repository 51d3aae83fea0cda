import json

import numpy as np

from dml_core.metrics import EvaluationReport, UpdateGate, evaluate_embeddings
from tests.dml_core.metrics.test_compatibility import models


def test_report_roundtrip_and_contents(tmp_path):
    old, new, _, y = models()
    plot = str(tmp_path / "plots" / "utility.png")
    floor = {"recall_at_k": {"1": 0.25}, "map_at_r": 0.1}
    rep = evaluate_embeddings(new, y, old_z=old, floor=floor, plot_url=plot, meta={"model": "v2"})
    text = rep.to_json()
    d = json.loads(text)
    assert set(d) == {"schema_version", "retrieval", "opis", "compatibility", "gate", "floor", "plots", "meta"}
    assert d["floor"] == floor and d["gate"]["floor"] == 0.25 and "floor" not in rep.gate.failed
    assert d["retrieval"]["recall_at_1"] == rep.retrieval.recall[1]
    assert d["opis"]["opis"] == rep.opis.opis and "class_utility" not in d["opis"]
    assert d["gate"]["allowed"] == rep.gate.allowed and d["compatibility"]["ref_model"] == "new"
    assert d["plots"]["utility"] == plot and (tmp_path / "plots" / "utility.png").read_bytes()[:4] == b"\x89PNG"
    back = EvaluationReport.from_json(text)
    assert back.to_json() == text
    assert back.gate == rep.gate and back.compatibility.to_dict() == rep.compatibility.to_dict()
    full = EvaluationReport.from_dict(json.loads(rep.to_json(include_curves=True)))
    np.testing.assert_array_equal(full.opis.class_utility, rep.opis.class_utility)


def test_report_without_compatibility():
    _, new, _, y = models()
    rep = evaluate_embeddings(new, y, ks=(1, 2), opis_kwargs={"max_neg_per_class": 100, "num_calibration_pairs": 5000})
    d = rep.to_dict()
    assert d["compatibility"] is None and d["floor"] is None
    assert d["gate"]["outcome"] == "first" and d["gate"]["conditions"] == []  # no floor measured: nothing to check
    below = evaluate_embeddings(new, y, floor={"recall_at_k": {"1": 1.0}, "map_at_r": 1.0}, gate=UpdateGate())
    assert below.gate.rejected and below.gate.below_floor
    assert d["opis"]["sampling"]["max_neg_per_class"] == 100
    assert EvaluationReport.from_dict(json.loads(json.dumps(d))).to_dict() == d

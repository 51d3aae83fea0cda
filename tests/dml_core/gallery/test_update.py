"""`update_serving` under the gate (METHODS 6): a rejected model leaves the registry byte for byte as it was,
a better incompatible model is backfilled, and in a chain a query model that would lower what is served is
not registered. Real gate decisions on constructed scores; the backfill is a recording stand-in (the real one
runs on Ray in tests/tasks/test_update.py)."""
import pytest

from dml_core import storage
from dml_core.gallery.registry import ModelRef, Registry
from dml_core.gallery.update import update_serving
from dml_core.metrics import CompatibilityResult, CrossModelScores, NegativeFlips, UpdateGate

V1, V2, V3 = (ModelRef(f"v{i}", f"/runs/v{i}/checkpoints/checkpoint_00000010") for i in (1, 2, 3))


def _compat(old_old, new_old, new_new, served=None, nfr=0.0):
    scores = {m: CrossModelScores.build(m, old_old, new_new, new_old, served=served) for m in ("recall_at_1", "map_at_r")}
    flips = {k: NegativeFlips(k, round(100 * nfr), 100, 50, nfr, nfr * 2) for k in ("new_old", "new_new")}
    return CompatibilityResult(mode="cross_leave_one_out", num_queries=100, scores=scores, flips=flips)


@pytest.fixture
def served(tmp_path):
    """A registry whose gallery `g` was embedded by v1 and is queried by v2 (a chain), and a backfill log."""
    registry, backfilled = Registry(str(tmp_path)), []

    def backfill(model):
        backfilled.append(model)
        return f"/galleries/g/{model.version}/manifest.json", f"/galleries/g/{model.version}/index.json"

    registry.switch("g", V1, *backfill(V1), "first")
    registry.set_query_model("g", V2, "compatible")
    backfilled.clear()
    return registry, backfill, backfilled


def test_a_worse_model_is_rejected_and_nothing_changes(served):
    registry, backfill, backfilled = served
    before = storage.read_bytes(registry.url)
    decision = UpdateGate().decide(_compat(0.60, 0.58, 0.59, served=0.62), floor=0.40)
    result = update_serving(registry, "g", V3, lambda current: decision, backfill)
    assert result.action == "rejected" and not result.backfilled and backfilled == []
    assert storage.read_bytes(registry.url) == before and result.entry == registry.gallery("g")


def test_below_the_floor_is_rejected_even_with_nothing_served(tmp_path):
    registry = Registry(str(tmp_path))
    result = update_serving(registry, "g", V1, lambda current: UpdateGate().first(0.3, floor=0.4),
                            lambda m: pytest.fail("a rejected model must not be backfilled"))
    assert result.action == "rejected" and result.entry is None and not storage.exists(registry.url)


def test_a_better_incompatible_model_is_backfilled(served):
    registry, backfill, backfilled = served
    decision = UpdateGate().decide(_compat(0.60, 0.20, 0.75, served=0.62, nfr=0.4), floor=0.40)
    result = update_serving(registry, "g", V3, lambda current: decision, backfill)
    assert result.action == "switch" and backfilled == [V3]
    assert registry.gallery("g").gallery_model == registry.gallery("g").query_model == V3


def test_in_a_chain_a_query_model_that_lowers_what_is_served_is_not_registered(served):
    registry, backfill, backfilled = served
    asked = []
    # beats the gallery model's own queries (0.60) but not v2's against that gallery (0.62)
    decision = UpdateGate().decide(_compat(0.60, 0.61, 0.61, served=0.62), floor=0.40)
    result = update_serving(registry, "g", V3, lambda current: asked.append(current) or decision, backfill)
    assert asked[0].query_model == V2 and asked[0].gallery_model == V1
    assert result.action == "rejected" and registry.gallery("g").query_model == V2 and backfilled == []
    better_backfill = UpdateGate().decide(_compat(0.60, 0.61, 0.70, served=0.62), floor=0.40)
    assert update_serving(registry, "g", V3, lambda current: better_backfill, backfill).action == "switch"
    assert registry.gallery("g").query_model == V3 and backfilled == [V3]


def test_a_gallery_moved_during_the_gate_is_gated_again_never_served_unchecked(served):
    """Driver A switches the gallery to vA while driver B's gate compares vB with v1: B's change, decided
    against v1, is refused by the registry and B's gate decides again against vA (here: rejected), so the
    registry never pairs vB with vA's index unchecked."""
    registry, backfill, backfilled = served
    v_a, seen = ModelRef("vA", "/runs/vA/checkpoints/checkpoint_00000010"), []

    def decide(current):
        seen.append(current)
        if len(seen) == 1:  # A lands its switch while B is being gated
            registry.switch("g", v_a, *backfill(v_a), "driver A")
            return UpdateGate().decide(_compat(0.60, 0.20, 0.75, served=0.62, nfr=0.4), floor=0.40)  # backfill
        return UpdateGate().decide(_compat(0.80, 0.20, 0.75, nfr=0.4), floor=0.40)  # worse than vA: rejected

    result = update_serving(registry, "g", V3, decide, backfill)
    assert [e.gallery_model.version for e in seen] == ["v1", "vA"]
    assert result.action == "rejected" and registry.gallery("g").gallery_model == registry.gallery("g").query_model == v_a
    assert [h["reason"] for h in registry.history("g")][-1] == "driver A"  # B's switch never landed

"""The retrain flow end to end on tiny Fashion-MNIST, real flow runs against a temporary Prefect API, real
in-process Ray: the demo's three-run story, run once for the module (about 3 minutes) and checked by each test.

- v1: the registry is empty, so the gallery is embedded and indexed with v1, which is registered.
- v2: BCT against the registry's gallery model (`loss.bct.old_checkpoint: gallery`), the same initialisation
  seed as v1; its gate passes, so v2 only becomes the query model: no gallery embedding at all.
- v3: another seed, no BCT; its gate against v1 (still the gallery model) fails: backfill, index, switch.
Gate thresholds: see STORY (why they are what they are is in its comment)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import ray

from dml_core import storage
from dml_core.gallery.embeddings import GALLERIES
from dml_core.gallery.registry import Registry
from tests.flows._flow_helpers import DATASET, artifacts, dml_events, task_runs, write_config

pytestmark = pytest.mark.slow

# (run name, --set items). v2 starts from v1's initialisation (the same train.seed) and trains twice as long
# with BCT (lambda 10) against v1: MAP@R(new,old) 0.397 > MAP@R(old,old) 0.392, NFR 0.15 <= 0.2 (measured
# with one worker; of 10 BCT settings tried on this data only those starting from v1's seed kept M(new,old)
# near M(old,old), and Recall@1(new,old) stayed just below). v3: another seed, no BCT: MAP@R(new,old) far below.
STORY = [("v1", []),
         ("v2", ["loss.bct={old_checkpoint: gallery, lambda_bct: 10.0}", "train.steps=120"]),
         ("v3", ["train.seed=1"])]
STAGES = ("shard", "train", "evaluate", "update", "publish")


def _files(url: str) -> dict[str, float]:
    """{path: mtime} of every file under a local folder."""
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs}


@pytest.fixture(scope="module")
def story(prefect_api, tmp_path_factory):
    import tasks.update
    from flows.retrain import retrain_flow

    root = str(tmp_path_factory.mktemp("retrain"))
    config = write_config(root)
    if ray.is_initialized():  # an earlier test's: each flow here must start (and shut down) its own
        ray.shutdown()
    backfills: list[str] = []  # the models the gallery was embedded with, in order (a spy on the real backfill)
    real = tasks.update.run_backfill
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.update, "run_backfill",
                   lambda cfg, checkpoint, version, **kw: backfills.append(version) or real(cfg, checkpoint, version, **kw))
        for name, overrides in STORY:
            datasets = _files(f"{root}/storage/datasets")
            state = retrain_flow(config, [f"run.name={name}", *overrides], return_state=True)
            assert state.is_completed(), state
            assert not ray.is_initialized()  # the flow shut down the Ray it started
            runs[name] = {"row": state.result(), "flow_run_id": state.state_details.flow_run_id,
                          "entry": Registry(f"{root}/storage").gallery(DATASET), "backfills": list(backfills),
                          "datasets_before": datasets, "datasets_after": _files(f"{root}/storage/datasets")}
    return {"root": root, "storage": f"{root}/storage", "config": config, "runs": runs}


def test_first_run_embeds_indexes_and_registers_the_gallery(story):
    run = story["runs"]["v1"]
    assert task_runs(run["flow_run_id"]) == {s: "Completed" for s in STAGES}
    assert run["row"]["verdict"] == "first model" and run["row"]["backfill"] and run["row"]["gallery_model"] is None
    assert run["backfills"] == ["v1"]
    entry = run["entry"]
    assert entry.gallery_model.version == entry.query_model.version == "v1"
    assert storage.exists(entry.index) and storage.exists(entry.embeddings)


def test_compatible_update_does_no_backfill_work(story):
    run = story["runs"]["v2"]
    row = run["row"]
    assert row["verdict"] == "compatible" and not row["backfill"], row["reasons"]
    assert row["gallery_model"] == "v1" and row["m_new_old"] > row["m_old_old"]
    assert run["backfills"] == ["v1"]  # no embedding of the gallery for v2
    assert not os.path.exists(f"{story['storage']}/{GALLERIES}/{DATASET}/v2")
    entry = run["entry"]
    assert (entry.gallery_model.version, entry.query_model.version) == ("v1", "v2")
    assert entry.index == story["runs"]["v1"]["entry"].index
    trained = storage.read_bytes(f"{story['storage']}/runs/v2/config.yaml").decode()
    assert f"old_checkpoint: {story['runs']['v1']['entry'].gallery_model.checkpoint}" in trained  # BCT against v1


def test_incompatible_update_backfills_and_switches(story):
    run = story["runs"]["v3"]
    row = run["row"]
    assert row["verdict"] == "backfill" and row["backfill"] and row["gallery_model"] == "v1"  # v1, not v2
    assert any(r.startswith("FAIL") for r in row["reasons"])
    assert run["backfills"] == ["v1", "v3"]
    entry = run["entry"]
    assert entry.gallery_model.version == entry.query_model.version == "v3" and entry.index != story["runs"]["v1"]["entry"].index
    assert [h["event"] for h in Registry(story["storage"]).history(DATASET)][:3] == ["switch", "query_model", "switch"]


def test_second_run_reuses_the_shards(story):
    for name in ("v2", "v3"):
        run = story["runs"][name]
        assert task_runs(run["flow_run_id"])["shard"] == "Cached"
        assert run["datasets_after"] == run["datasets_before"]  # not one file written or touched
    assert len(story["runs"]["v1"]["datasets_after"]) > len(story["runs"]["v1"]["datasets_before"]) == 0


def test_artifacts_and_summary_are_published(story):
    for name, run in story["runs"].items():
        row, found = run["row"], artifacts(run["flow_run_id"])
        assert set(found) == {f"{name}-metrics", f"{name}-gate", f"{name}-utility-plot"}
        table = {r["metric"]: r["value"] for r in json.loads(found[f"{name}-metrics"].data)}
        assert found[f"{name}-metrics"].type == "table"
        assert table["Recall@1"] == pytest.approx(row["recall_at_1"], abs=1e-6)
        assert {"Recall@5", "MAP@R", "OPIS", "0.1-OPIS"} <= set(table)
        if name != "v1":
            assert {"recall_at_1 M(new,old)", "map_at_r update gain", "NFR (new,old)"} <= set(table)
            assert table["NFR (new,old)"] == pytest.approx(row["nfr"], abs=1e-6)
        gate = found[f"{name}-gate"].data
        assert f"verdict: **{row['verdict']}**" in gate and all(r in gate for r in row["reasons"])
        plot = re.search(r"\(file://([^)]+)\)", found[f"{name}-utility-plot"].data).group(1)
        assert plot.endswith(f"runs/{name}/evaluation/utility.png")
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        saved = json.loads(storage.read_bytes(f"{story['storage']}/runs/{name}/evaluation/summary.json"))
        assert saved == row


def test_events_announce_backfills_and_registry_switches(story):
    events = [e for e in dml_events(expected=7) if e.payload.get("run") in story["runs"]]
    assert {e.resource.id for e in events} == {f"dml.gallery.{DATASET}"}
    seen = [(e.event, e.payload["run"]) for e in events]
    assert seen == [("dml.backfill.started", "v1"), ("dml.backfill.finished", "v1"), ("dml.registry.switched", "v1"),
                    ("dml.registry.switched", "v2"),
                    ("dml.backfill.started", "v3"), ("dml.backfill.finished", "v3"), ("dml.registry.switched", "v3")]
    assert [e.payload["action"] for e in events if e.event == "dml.registry.switched"] == ["first", "query_model", "switch"]


def test_metrics_json_matches_a_recomputation_from_the_saved_embeddings(story):
    from dml_core.metrics.compatibility import evaluate_compatibility
    from dml_core.metrics.gate import UpdateGate
    from dml_core.metrics.opis import opis
    from dml_core.metrics.retrieval import evaluate_retrieval

    for name, (_, overrides) in zip(("v1", "v2"), STORY):
        ev = f"{story['storage']}/runs/{name}/evaluation"
        metrics = json.loads(storage.read_bytes(f"{ev}/metrics.json"))
        saved = np.load(f"{ev}/embeddings.npz")
        z, labels = saved["z"], saved["labels"]
        assert len(z) == metrics["num_queries"] == 100
        ret = evaluate_retrieval(z, labels, ks=(1, 5, 10), backend="torch")
        assert metrics["recall_at_k"] == pytest.approx({str(k): v for k, v in ret.recall.items()})
        assert metrics["map_at_r"] == pytest.approx(ret.map_at_r)
        o = opis(z, labels)
        assert (metrics["opis"], metrics["eps_opis"]) == pytest.approx((o.opis, o.eps_opis))
        if name == "v1":
            assert "old_z" not in saved and metrics["compatibility"] is None
            continue
        compat = evaluate_compatibility(saved["old_z"], z, labels, backend="torch")
        for metric, s in compat.scores.items():
            assert metrics["compatibility"][metric]["new_old"] == pytest.approx(s.new_old)
            assert metrics["compatibility"][metric]["old_old"] == pytest.approx(s.old_old)
        assert metrics["nfr"] == pytest.approx(compat.flips["new_old"].nfr)
        gate = UpdateGate(max_nfr=0.2, metric="map_at_r").decide(compat)
        assert metrics["gate"]["allowed"] == gate.allowed and story["runs"][name]["row"]["reasons"] == gate.reasons()


def test_stage_flows_reuse_the_retrain_outputs(story):
    from flows.stages import backfill_flow, evaluate_flow, shard_flow, train_flow

    config, over = story["config"], ["run.name=v3", "train.seed=1"]
    assert shard_flow(config, over)["resharded"] is False
    state = train_flow(config, over, return_state=True)
    assert state.result()["checkpoint"] == story["runs"]["v3"]["entry"].gallery_model.checkpoint
    assert task_runs(state.state_details.flow_run_id) == {"train": "Cached"}
    row = evaluate_flow(config, over)
    assert row["gallery_model"] == "v3" and row["verdict"] == "backfill"  # a model against itself is no gain
    out = backfill_flow(config, over)
    entry = Registry(story["storage"]).gallery(DATASET)
    assert entry.gallery_model.version == "v3" and entry.index == out["index"]

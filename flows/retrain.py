"""The retrain flow: shard -> train -> (with `backfill.transformation`: train h from the gallery model to the
new one) -> evaluate against what the registry serves, the gallery transformed by h and the raw-pixel floor ->
gate -> reject (nothing changes), register the new query model (backfill-free), serve the transformed gallery
(then re-embed it in order up to `backfill.budget`), or backfill, index and switch -> publish (summary row,
artifacts)."""
from __future__ import annotations

from prefect import flow

from dml_core.gallery.gallery_model import current_serving
from flows.stages import evaluate_step, load, run_name, shard_step, train_step
from tasks.ray_runtime import ray_session
from tasks.shard import with_version
from tasks.workflow import publish_task, transformation_task, update_task

VERDICTS = {"first": "first model", "query_model": "compatible", "transformed": "transformed gallery", "switch": "backfill",
            "rejected": "rejected"}


@flow(name="retrain", flow_run_name=run_name)
def retrain_flow(config: str, overrides: list[str] | None = None) -> dict:
    """One scheduled retrain of `run.name`; returns its summary row (also in its evaluation/summary.json)."""
    cfg = load(config, overrides)
    cfg = with_version(cfg, shard_step(cfg)["version"])
    old, served = current_serving(cfg)
    with ray_session():
        trained = train_step(cfg)
        h = transformation_task(cfg, trained["checkpoint"])
        evaluation = evaluate_step(cfg, trained["checkpoint"], old, served, h)
        update = update_task(cfg, trained["checkpoint"], evaluation["metrics"]["gate"], old, served, h)
    if update["reasons"] is None:  # decided as the evaluation's gate did
        return publish_task(evaluation, cfg.gate.metric, VERDICTS[update["action"]], update["backfill"],
                            evaluation["summary"]["reasons"])
    return publish_task(evaluation, cfg.gate.metric, VERDICTS[update["action"]], update["backfill"],
                        update["reasons"], gallery_model=update["compared_with"])

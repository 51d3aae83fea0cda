"""A tiny real flow with the retrain flow's signature, for serving tests (the retrain flow is too slow there):
it loads the config like every flow, records how it was started, and sleeps for DML_TINY_FLOW_SLEEP s."""
from __future__ import annotations

import json
import os
import time

from prefect import flow, runtime

from dml_core.config import load_config, parse_overrides


@flow
def tiny_flow(config: str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(config, parse_overrides(overrides))
    record = {"config": config, "overrides": overrides, "steps": cfg.train.steps, "pid": os.getpid(),
              "deployment": runtime.deployment.name, "flow_run": str(runtime.flow_run.id),
              "scheduled_start": runtime.flow_run.scheduled_start_time.isoformat()}
    out = os.path.join(cfg.run.root, "tiny-runs")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{record['flow_run']}.started.json"), "w") as f:
        json.dump(record, f)
    time.sleep(float(os.environ.get("DML_TINY_FLOW_SLEEP", "0")))
    os.rename(os.path.join(out, f"{record['flow_run']}.started.json"),
              os.path.join(out, f"{record['flow_run']}.finished.json"))
    return record

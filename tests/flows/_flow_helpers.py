"""Shared pieces of the flow tests: a tiny retrain config and reading runs, artifacts and events back from
the Prefect API."""
from __future__ import annotations

import time

import yaml

DATASET = "glyphs-tiny"


def write_config(root: str, **sections) -> str:
    """A retrain config on tiny font glyphs (the first 60 code points at 16 px: 30 training classes, 30 held-out
    ones of 930 queries and 930 gallery images), a small CNN, one in-process Ray worker; `sections` update it
    per section. A task where learning matters: raw pixels reach MAP@R 0.48 on the held-out classes, 300 steps
    (about 8 s) 0.53-0.61. Gate: MAP@R, max_nfr 0.2."""
    raw = {"run": {"name": "v1", "root": f"{root}/storage"},
           "data": {"dataset": DATASET, "batch_size": 32, "p": 8, "k": 4,
                    "source": {"kind": "font_glyphs", "image_size": 16, "max_classes": 60},
                    "sharding": {"seed": 0, "eval_class_fraction": 0.5, "gallery_fraction": 0.5,
                                 "max_shard_samples": 500}},
           "model": {"embedding_dim": 32, "image_size": 16, "backbone_options": {"widths": [16, 32]}},
           "train": {"steps": 300, "lr": 3e-3, "checkpoint_every": 1000, "log_every": 1000},
           "ray": {"num_workers": 1}, "backfill": {"batch_size": 128},
           "gate": {"metric": "map_at_r", "max_nfr": 0.2, "min_gain": 0.0}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = f"{root}/retrain.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def task_runs(flow_run_id) -> dict[str, str]:
    """{task name: state name} of a flow run's task runs, read from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def artifacts(flow_run_id) -> dict[str, object]:
    """{artifact key: artifact} of a flow run, read from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def dml_events(expected: int, timeout: float = 60.0) -> list:
    """The `dml.*` events in the Prefect API, oldest first, once `expected` have arrived (they are sent
    in the background)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(EventFilter(event=EventNameFilter(prefix=["dml."])), limit=50).events
        if len(events) >= expected or time.monotonic() > deadline:
            return sorted(events, key=lambda e: e.occurred)
        time.sleep(1)

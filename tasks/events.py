"""Prefect events of the serving update, so automations and other systems can react to it: a backfill
starting and finishing, and every registry change (`action`: first, switch after a backfill, query_model
for a backfill-free update, transformed for a gallery mapped by h, reembedded after a partial backfill). Resource: `dml.gallery.<gallery>`; the model and run are related resources."""
from __future__ import annotations

from prefect.events import emit_event

from dml_core.gallery.registry import GalleryEntry, ModelRef

BACKFILL_STARTED, BACKFILL_FINISHED, REGISTRY_SWITCHED = ("dml.backfill.started", "dml.backfill.finished",
                                                          "dml.registry.switched")


def gallery_resource(gallery: str) -> dict[str, str]:
    return {"prefect.resource.id": f"dml.gallery.{gallery}", "prefect.resource.name": gallery}


def _model(model: ModelRef, role: str) -> dict[str, str]:
    return {"prefect.resource.id": f"dml.model.{model.version}", "prefect.resource.role": role,
            "prefect.resource.name": model.version}


def emit_backfill(stage: str, gallery: str, model: ModelRef, run: str) -> None:
    """`dml.backfill.started` / `.finished` (`stage`) for the gallery being embedded with `model`."""
    emit_event(BACKFILL_STARTED if stage == "started" else BACKFILL_FINISHED, resource=gallery_resource(gallery),
               related=[_model(model, "gallery-model")],
               payload={"run": run, "model_version": model.version, "checkpoint": model.checkpoint})


def emit_switched(gallery: str, action: str, entry: GalleryEntry, run: str) -> None:
    """`dml.registry.switched`: the gallery's registry entry changed (`action`: first, switch, query_model,
    transformed, reembedded); `backfill` says whether gallery images were embedded."""
    emit_event(REGISTRY_SWITCHED, resource=gallery_resource(gallery),
               related=[_model(entry.gallery_model, "gallery-model"), _model(entry.query_model, "query-model")],
               payload={"run": run, "action": action, "backfill": action in ("first", "switch", "reembedded"),
                        "gallery_model": entry.gallery_model.version, "query_model": entry.query_model.version,
                        "index": entry.index, "transformation": entry.transformation and entry.transformation.version,
                        "reembedded": entry.reembedded})

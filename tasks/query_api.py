"""The query service (`dml api`): a Ray Serve application whose replicas each serve a `ServedGallery` that
follows the registry, behind a FastAPI ingress.

    POST /query   {"images": [base64 of an image file, ...], "k": 10}  -> the k nearest gallery items per image
    GET  /health  -> gallery, gallery model, query model, index (what the next query is answered with)

Replicas autoscale between one and the cluster's CPU count; each swaps its own snapshot when the registry
changes (a poll every `poll_seconds`), so during a swap two replicas may briefly serve the old and the new
pairing, each answer from one registered pairing.
"""
import base64
import binascii
import logging
import signal
import threading

import ray
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from dml_core import storage
from dml_core.config import Config
from dml_core.gallery.query import served_entry
from dml_core.gallery.registry import Registry
from dml_core.gallery.serving import QueryError, ServedGallery, answer, single_threaded

APP_NAME = "dml-query"
api = FastAPI(title="dml query service", description="Nearest gallery items of query images.")


class QueryRequest(BaseModel):
    images: list[str] = Field(description="Image files (PNG, JPEG, ...), base64-encoded.")
    k: int = Field(10, ge=1, description="Neighbours per image.")


def _print_swap(now: dict) -> None:
    print(f"[api] gallery {now['gallery']}: now query model {now['query_model']}, gallery model "
          f"{now['gallery_model']}, index {now['index']}", flush=True)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_constructor_retry_count=2,
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
@serve.ingress(api)  # no `from __future__ import annotations` here: FastAPI reads the request type at runtime
class QueryService:
    """One replica: the gallery's served snapshot, refreshed from the registry by a thread of its own."""

    def __init__(self, root: str, gallery: str, storage_settings, poll_seconds: float) -> None:
        storage.configure(storage_settings)
        single_threaded()
        self.served = ServedGallery(Registry(root), gallery)
        self.stop = self.served.follow(poll_seconds, on_swap=_print_swap)

    @api.post("/query")
    def query(self, request: QueryRequest) -> dict:
        try:
            images = [base64.b64decode(x, validate=True) for x in request.images]
        except binascii.Error as e:
            raise HTTPException(400, f"images must be base64-encoded image files: {e}") from None
        try:
            result = self.served.search(images, request.k)
        except QueryError as e:
            raise HTTPException(400, str(e)) from None
        return answer(self.served.gallery, result, [str(i) for i in range(len(images))])

    @api.get("/health")
    def health(self) -> dict:
        return self.served.health()

    def __del__(self) -> None:
        if hasattr(self, "stop"):  # not when __init__ failed
            self.stop.set()


def check_served(cfg: Config, gallery: str) -> None:
    served_entry(Registry(cfg.run.root), gallery)


def start_api(cfg: Config, gallery: str, host: str = "127.0.0.1", port: int = 8000, poll_seconds: float = 2.0,
              replicas: int | None = None) -> None:
    """Deploy the service on the Ray this process is connected to and return once it answers on host:port.
    `replicas`: a fixed count; None autoscales between 1 and the cluster's CPUs."""
    check_served(cfg, gallery)
    scale = ({"num_replicas": replicas} if replicas else
             {"autoscaling_config": {"min_replicas": 1, "max_replicas": max(1, int(ray.cluster_resources()["CPU"])),
                                     "target_ongoing_requests": 2}})
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    app = QueryService.options(**scale).bind(cfg.run.root, gallery, cfg.storage, poll_seconds)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def stop_api() -> None:
    serve.shutdown()  # the application and Serve's own actors


def serve_until_signal(cfg: Config, gallery: str, host: str, port: int, poll_seconds: float = 2.0,
                       replicas: int | None = None) -> None:
    """`dml api`: start the service on the config's Ray (in-process unless `ray.address`) and serve until
    SIGINT or SIGTERM; then the service, and a Ray started here, are shut down."""
    from tasks.ray_runtime import init_ray, ray_session

    check_served(cfg, gallery)  # before Ray starts
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up notes; ours are printed
    with ray_session():
        init_ray(cfg, cfg.run_dir)
        try:
            start_api(cfg, gallery, host, port, poll_seconds, replicas)
            stop = threading.Event()
            previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
            print(f"[api] gallery {gallery} on http://{host}:{port} (POST /query, GET /health); Ctrl-C stops",
                  flush=True)
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            print("[api] stopping", flush=True)
        finally:
            stop_api()

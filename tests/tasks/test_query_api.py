"""The query service on Ray Serve, over real HTTP on 127.0.0.1: answers equal GalleryQuery.search, bad requests
are 400s, and a stream of requests through a backfill-free update and a full switch of the registry: every
response succeeds, each from a (query model, index) pair registered together, old to new from one request to
the next."""
import base64
import threading
import time

import httpx
import pytest
import torch

from dml_core.config import config_from_dict
from dml_core.gallery.query import GalleryQuery
from dml_core.gallery.serving import served_by
from tests.conftest import free_port
from tests.dml_core.gallery._served_gallery import build_served_files

# the reference searches single-threaded, as the service's replicas do
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TIMEOUT = 120  # seconds for any one wait on the service


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_local):
    """The service on the module's in-process Ray (one replica, registry read every 0.1 s), serving a registry
    of its own: {"url", "files", "registry"}."""
    from tasks.query_api import start_api, stop_api

    tmp = tmp_path_factory.mktemp("query-api")
    files = build_served_files(tmp)
    root = str(tmp / "served")
    registry = files.registry(root)
    port = free_port()
    cfg = config_from_dict({"run": {"name": "api", "root": root}, "data": {"dataset": files.gallery}})
    start_api(cfg, files.gallery, "127.0.0.1", port, poll_seconds=0.1, replicas=1)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "files": files, "registry": registry}
    finally:
        stop_api()


def encoded(paths: list[str]) -> list[str]:
    return [base64.b64encode(open(p, "rb").read()).decode() for p in paths]


def assert_answers(response: dict, reference) -> None:
    """A /query response says what GalleryQuery.search says on the same images with the same entry."""
    results = response["results"]
    assert [r["image"] for r in results] == [str(i) for i in range(len(reference.ids))]
    assert torch.equal(torch.tensor([r["ids"] for r in results]), reference.ids)
    assert torch.equal(torch.tensor([r["labels"] for r in results]), reference.labels)
    assert [r["classes"] for r in results] == reference.classes
    assert torch.allclose(torch.tensor([r["distances"] for r in results]), reference.distances.float(), atol=1e-5)


def wait_for_health(url: str, want, pair) -> None:
    """Until GET /health reports the pair `want` (each poll is a response, so no sleep is guessed)."""
    deadline = time.monotonic() + TIMEOUT
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        while pair(client.get("/health").json()) != want:
            assert time.monotonic() < deadline, f"the service never served {want}"


def test_answers_equal_gallery_query_search(service):
    files, registry = service["files"], service["registry"]
    with httpx.Client(base_url=service["url"], timeout=TIMEOUT) as client:
        health = client.get("/health").json()
        entry = registry.gallery(files.gallery)
        assert health == served_by(files.gallery, entry)
        response = client.post("/query", json={"images": encoded(files.images), "k": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["query_model"], answer["index"]) == (health["query_model"], health["index"])
    assert_answers(answer, GalleryQuery(registry, files.gallery, entry=entry).search(files.images, 5))
    assert all(isinstance(c, str) for r in answer["results"] for c in r["classes"])


def test_bad_requests_are_400_with_a_reason(service):
    good = encoded(service["files"].images[:1])
    cases = [({"images": ["not base64!"], "k": 3}, 400, "base64"),
             ({"images": [base64.b64encode(b"not an image").decode()], "k": 3}, 400, "could not be decoded"),
             ({"images": good, "k": 10_000}, 400, "between 1 and the gallery's size"),
             ({"images": [], "k": 3}, 400, "no image"),
             ({"images": good, "k": 0}, 422, "greater than or equal to 1")]
    with httpx.Client(base_url=service["url"], timeout=TIMEOUT) as client:
        for body, status, reason in cases:
            response = client.post("/query", json=body)
            assert (response.status_code, reason in response.text) == (status, True), (body, response.text)


def test_a_registry_switch_during_a_stream_of_requests(service):
    files, registry, k = service["files"], service["registry"], 4
    entries = [files.registry(registry.url.rsplit("/", 1)[0]).gallery(files.gallery)]  # v1 serves again
    responses, failures, stop, progress = [], [], threading.Event(), threading.Condition()

    def stream() -> None:
        with httpx.Client(base_url=service["url"], timeout=TIMEOUT) as client:
            while not stop.is_set():
                try:
                    response = client.post("/query", json={"images": encoded(files.images), "k": k})
                    ok = response.status_code == 200
                except httpx.HTTPError as e:
                    ok, response = False, e
                with progress:
                    (responses if ok else failures).append(response.json() if ok else response)
                    progress.notify_all()

    def served(entry) -> bool:
        """Whether the last response came from `entry` (or a request failed), waited for up to TIMEOUT."""
        with progress:
            return progress.wait_for(lambda: failures or (responses and pair(responses[-1]) == pair(entry)), TIMEOUT)

    def pair(x) -> tuple[str, str]:
        return (x["query_model"], x["index"]) if isinstance(x, dict) else (x.query_model.version, x.index)

    wait_for_health(service["url"], pair(entries[0]), pair)  # the reset to v1 is served
    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert served(entries[0])
        for change in (files.query_model_update, files.full_switch):
            entries.append(change(registry))
            assert served(entries[-1])
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT)
    assert not failures
    pairs = [pair(e) for e in entries]
    assert len(set(pairs)) == 3
    order = [pairs.index(pair(r)) for r in responses]  # every response from a registered pair (else ValueError)
    assert order == sorted(order) and set(order) == {0, 1, 2}  # old to new from one request to the next, never back
    reference = {pair(e): GalleryQuery(registry, files.gallery, entry=e).search(files.images, k) for e in entries}
    assert len({tuple(r.ids.flatten().tolist()) for r in reference.values()}) == 3  # the pairings answer apart
    for r in responses:
        assert_answers(r, reference[pair(r)])

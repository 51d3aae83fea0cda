"""ServedGallery: answers against brute force with the dataset's class names, swaps under concurrent searches
that only ever pair a query model with the index it was registered with, an entry that fails to load never
swapped in, query errors; class names through a transformed gallery's source."""
import json
import threading
import time

import pytest
import torch

from dml_core.gallery.query import GalleryQuery, dataset_class_names
from dml_core.gallery.registry import ModelRef
from dml_core.gallery.serving import QueryError, ServedGallery, served_by
from tests.dml_core.gallery._served_gallery import build_served_files

# searches single-threaded here as in the service, so near-tied distances of untrained models rank alike
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_served_files(tmp_path_factory.mktemp("served"))


def brute_force(entry, images, k):
    """Top-k by exact cosine similarity of the query model's embeddings against every gallery embedding."""
    from dml_core.data.decode import decode_image
    from dml_core.gallery.embeddings import load_gallery
    from dml_core.training.embed import load_checkpoint_model

    gallery = load_gallery(entry.embeddings.rsplit("/", 1)[0])
    model = load_checkpoint_model(entry.query_model.checkpoint)
    with torch.no_grad():
        z = model(torch.stack([decode_image(open(p, "rb").read(), 28, 1) for p in images]))
    sims = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(gallery.z, dim=1).T
    top = sims.topk(k, dim=1)
    return gallery.ids[top.indices], gallery.labels[top.indices], 1.0 - top.values


def test_answers_are_the_exact_neighbours_with_their_dataset_class_names(files, tmp_path):
    registry = files.registry(str(tmp_path))
    files.query_model_update(registry)
    served = ServedGallery(registry, files.gallery)
    found = served.search(files.images, 5)
    ids, labels, distances = brute_force(registry.gallery(files.gallery), files.images, 5)
    assert torch.equal(found.ids, ids) and torch.equal(found.labels, labels)
    assert torch.allclose(found.distances, distances, atol=1e-5)
    names = json.load(open(f"{files.manifest.url}/manifest.json"))["class_names"]
    assert found.classes == [[names[label] for label in row] for row in labels.tolist()]
    assert len(set(sum(found.classes, []))) > 1 and all(isinstance(c, str) for c in sum(found.classes, []))
    assert served.health() == {"gallery": files.gallery, "gallery_model": "v1", "query_model": "v2",
                               "index": files.backfills["v1"][1], "transformation": None, "reembedded": None}


def test_concurrent_searches_see_only_registered_pairs_and_switch_once(files, tmp_path):
    registry = files.registry(str(tmp_path))
    served = ServedGallery(registry, files.gallery)
    seen, errors, stop, progress = [[] for _ in range(3)], [], threading.Event(), threading.Condition()

    def stream(out: list) -> None:
        try:
            while not stop.is_set():
                result = served.search(files.images, 4)
                with progress:
                    out.append(result)
                    progress.notify_all()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def each_stream_saw(entry) -> None:
        with progress:
            assert progress.wait_for(lambda: errors or all(out and out[-1].entry == entry for out in seen), 120)

    threads = [threading.Thread(target=stream, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    entries = [registry.gallery(files.gallery)]
    try:
        each_stream_saw(entries[0])
        for change in (files.query_model_update, files.full_switch):
            entries.append(change(registry))
            assert served.current.entry == entries[-2]  # nothing moves before a refresh
            assert served.refresh() and not served.refresh()
            each_stream_saw(entries[-1])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    reference = {e: GalleryQuery(registry, files.gallery, entry=e).search(files.images, 4) for e in entries}
    assert len({tuple(r.ids.flatten().tolist()) for r in reference.values()}) == 3  # the pairings answer apart
    for out in seen:
        order = [entries.index(r.entry) for r in out]  # every answer came from a registered entry
        assert order == sorted(order) and set(order) == {0, 1, 2}  # old to new, never back
        for r in out:
            want = reference[r.entry]
            assert torch.equal(r.ids, want.ids) and torch.equal(r.labels, want.labels), served_by("g", r.entry)


def test_an_entry_that_fails_to_load_is_not_swapped_in(files, tmp_path):
    registry = files.registry(str(tmp_path))
    served = ServedGallery(registry, files.gallery)
    before = served.search(files.images, 3)
    registry.set_query_model(files.gallery, ModelRef("broken", str(tmp_path / "no-such-checkpoint")), "test")
    with pytest.raises(FileNotFoundError):
        served.refresh()
    assert served.health()["query_model"] == "v1"
    assert torch.equal(served.search(files.images, 3).ids, before.ids)
    stop = served.follow(interval=0.05)  # logs the broken entry at each poll, keeps serving v1
    try:
        files.full_switch(registry)
        deadline = time.monotonic() + 60
        while served.health()["query_model"] != "v3":  # the follower's next poll swaps
            assert time.monotonic() < deadline, "the follower never swapped in v3"
            time.sleep(0.05)
    finally:
        stop.set()
    assert served.search(files.images, 3).entry == registry.gallery(files.gallery)


def test_query_errors(files, tmp_path):
    served = ServedGallery(files.registry(str(tmp_path)), files.gallery)
    size = served.current.index.count
    for images, k, message in (([], 3, "no image"), (files.images, 0, "between 1 and"),
                               (files.images, size + 1, f"the gallery's size {size}"),
                               ([b"not an image"], 3, "could not be decoded")):
        with pytest.raises(QueryError, match=message):
            served.search(images, k)
    assert served.search(files.images, size).ids.shape == (3, size)


def test_class_names_of_a_transformed_gallery_come_from_its_source(files, tmp_path):
    def manifest(folder, **meta):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(meta))
        return str(folder)

    dataset = files.manifest.url
    source = manifest(tmp_path / "v1", shards=[{"file": "embeddings-000000.npz", "shard": f"{dataset}/gallery-0.tar"}])
    transformed = manifest(tmp_path / "v2-transformed", transformed_from=source,
                           shards=[{"file": "embeddings-000000.npz", "shard": f"{source}/embeddings-000000.npz"}])
    assert dataset_class_names(transformed) == dataset_class_names(source) == list(files.manifest.class_names)
    elsewhere = manifest(tmp_path / "v0", shards=[{"file": "e.npz", "shard": str(tmp_path / "gone" / "g.tar")}])
    assert dataset_class_names(elsewhere) is None

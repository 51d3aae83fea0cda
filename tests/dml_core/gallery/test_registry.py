"""The serving registry: a chain of backfill-free updates keeps the gallery model, a switch is guarded by the
index check, every change is one atomic rewrite with history, on local disk and on S3."""
import json

import pytest

from dml_core import storage
from dml_core.gallery.registry import GalleryEntry, ModelRef, Registry, RegistryError

V1, V2, V3, V4 = (ModelRef(f"v{i}", f"s3://b/runs/v{i}/checkpoints/checkpoint_00000010") for i in range(1, 5))


def _backfilled(registry: Registry, model: ModelRef) -> GalleryEntry:
    base = f"galleries/fmnist/{model.version}"
    return registry.switch("fmnist", model, f"{base}/manifest.json", f"{base}/index.json", "incompatible")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").url("registry-" + request.node.name.replace("[", "-").rstrip("]"))


def test_chain_of_compatible_updates_keeps_the_gallery_model(root):
    reg = Registry(root)
    assert reg.gallery("fmnist") is None
    first = _backfilled(reg, V1)
    reg.set_query_model("fmnist", V2, "compatible with v1")
    entry = reg.set_query_model("fmnist", V3, "compatible with v1")
    assert entry == GalleryEntry(V1, V3, first.embeddings, first.index)
    assert Registry(root).gallery("fmnist") == entry  # as read back from storage
    assert [h["event"] for h in reg.history("fmnist")] == ["switch", "query_model", "query_model"]
    assert [h["entry"]["query_model"]["version"] for h in reg.history()] == ["v1", "v2", "v3"]
    after = _backfilled(reg, V4)
    assert after.gallery_model == after.query_model == V4 and reg.gallery("fmnist") == after


def test_backfill_free_update_needs_an_index(root):
    with pytest.raises(RegistryError, match="has no index"):
        Registry(root).set_query_model("fmnist", V2, "compatible")


def test_a_failed_index_check_leaves_the_registry_as_it_was(root):
    def refuse(index, embeddings):
        raise ValueError(f"index {index} is incomplete")

    _backfilled(Registry(root), V1)
    before = storage.read_bytes(storage.join(root, "registry.json"))
    with pytest.raises(ValueError, match="incomplete"):
        _backfilled(Registry(root, check_index=refuse), V2)
    assert storage.read_bytes(storage.join(root, "registry.json")) == before


def test_unreadable_registry_is_named(tmp_path):
    root = str(tmp_path)
    (tmp_path / "registry.json").write_text(json.dumps({"galleries": {"g": {"gallery_model": {}}}, "history": []}))
    with pytest.raises(RegistryError, match="registry.json is unreadable"):
        Registry(root).gallery("g")
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(RegistryError, match="registry.json is unreadable"):
        Registry(root).galleries()


def _switch_many(root: str, gallery: str, n: int, ready, go) -> None:
    """A second writer: `n` switches of its own gallery, started together with the other writer's."""
    reg = Registry(root)
    ready.set()
    go.wait()
    for i in range(n):
        _ = reg.switch(gallery, ModelRef(f"{gallery}-{i}", "ck"), f"{gallery}/{i}/manifest.json",
                       f"{gallery}/{i}/index.json", f"change {i}")


def test_two_writers_keep_every_change(root):
    """Two processes, 50 switches each on their own gallery of one registry: all 100 changes are kept (a
    compare-and-swap; a plain read-modify-write loses some of them)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(2)]
    procs = [ctx.Process(target=_switch_many, args=(root, g, 50, r, go)) for g, r in zip(("a", "b"), readies)]
    for p in procs:
        p.start()
    for r in readies:
        assert r.wait(120), "a writer did not start"
    go.set()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    reg = Registry(root)
    for g in ("a", "b"):
        assert [h["reason"] for h in reg.history(g)] == [f"change {i}" for i in range(50)]
        assert reg.gallery(g).gallery_model.version == f"{g}-49"


def test_a_change_decided_against_a_moved_entry_is_refused(root):
    from dml_core.gallery.registry import RegistryChanged

    reg = Registry(root)
    first = _backfilled(reg, V1)
    _backfilled(reg, V2)  # another writer switched the gallery after `first` was read
    with pytest.raises(RegistryChanged, match="decided against gallery model v1.*now has gallery model v2"):
        reg.set_query_model("fmnist", V3, "compatible with v1", expected=first)
    with pytest.raises(RegistryChanged):
        reg.switch("fmnist", V4, "m", "i", "first model", expected=None)
    assert reg.gallery("fmnist").query_model == V2 and len(reg.history("fmnist")) == 2


def test_a_registry_without_history_reads_as_one_with_none(root):
    storage.write_bytes_atomic(storage.join(root, "registry.json"), json.dumps({"format": 1, "galleries": {}}).encode())
    reg = Registry(root)
    assert reg.history() == [] and reg.gallery("fmnist") is None
    _backfilled(reg, V1)
    assert len(reg.history()) == 1

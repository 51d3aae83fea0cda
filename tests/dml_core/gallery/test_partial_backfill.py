"""The ordered partial backfill (FastFill, METHODS 6.1) in the library: the order, the steps, the gallery state
against a dict-by-id reference, and a real driver process SIGKILLed after step 2's record, resumed to the end:
the same steps and gallery as an uninterrupted run, and the registry pointing at a complete, matching index
at every point observed. The gallery is a real transformed one (a random h through `transform_shard`); the
new model is a fixed random linear map of per-id fake images, injected as the embedding function."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from dml_core import storage
from dml_core.gallery.embeddings import MANIFEST_FILE, GalleryError, ShardTask, load_gallery, write_manifest
from dml_core.gallery.index import GalleryIndex, build_index
from dml_core.gallery.partial_backfill import (ORDER_FILE, Step, gallery_state, load_order, partial_backfill,
                                               plan_steps, read_step_record, reembed_dir, reembed_order)
from dml_core.gallery.registry import ModelRef, Registry
from dml_core.gallery.transform import source_tasks, transform_shard, transformed_url
from dml_core.gallery.update import check_index
from dml_core.models.transformation import Transformation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NAME, OLD_DIM, NEW_DIM, SHARDS = "g", 8, 6, (17, 20, 13)  # 50 items in 3 shards
V1, V2, H = ModelRef("v1", "ckpt/v1"), ModelRef("v2", "ckpt/v2"), ModelRef("h", "ckpt/h")


def new_model(ids) -> np.ndarray:
    """The 'new model': a fixed random linear map of a fake image drawn from each id, L2-normalised."""
    w = np.random.default_rng(123).normal(size=(12, NEW_DIM))
    images = np.stack([np.random.default_rng(int(i)).normal(size=12) for i in ids])
    z = images @ w
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def _write_old_shard(out: str, index: int, ids: np.ndarray, rng) -> None:
    task = ShardTask(index, f"dataset/gallery-{index:06d}.tar", len(ids))
    buf = io.BytesIO()
    np.savez(buf, z=rng.normal(size=(len(ids), OLD_DIM)).astype(np.float32), ids=ids, labels=ids % 5)
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(out, task.file), data)
    record = {"index": index, "shard": task.url, "file": task.file, "count": len(ids), "skipped": 0,
              "dim": OLD_DIM, "dtype": "float32", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes_atomic(storage.join(out, task.record), json.dumps(record).encode())


def make_transformed_gallery(root: str) -> str:
    """v1's gallery (random vectors, scattered ids), transformed by a random FastFill h into v2's version and
    registered as such (with checked indexes); the transformed gallery's folder. Deterministic."""
    rng = np.random.default_rng(0)
    ids = rng.choice(10_000, size=sum(SHARDS), replace=False).astype(np.int64)
    old = storage.join(root, "galleries", NAME, "v1")
    bounds = np.cumsum((0, *SHARDS))
    for i in range(len(SHARDS)):
        _write_old_shard(old, i, ids[bounds[i]:bounds[i + 1]], rng)
    meta = {"gallery": NAME, "dataset": {"name": "d", "version": "1", "split": "gallery"}}
    write_manifest(old, [ShardTask(i, f"dataset/gallery-{i:06d}.tar", n) for i, n in enumerate(SHARDS)], meta)
    torch.manual_seed(0)
    h = Transformation(OLD_DIM, NEW_DIM, branch_width=16, trunk_width=32, uncertainty=True)
    out, tasks = transformed_url(root, NAME, "v2"), source_tasks(old)
    for t in tasks:
        transform_shard(h, t, out)
    write_manifest(out, tasks, {**meta, "transformed_from": old, "transformation": H.checkpoint})
    registry = Registry(root, check_index=check_index)
    for d in (old, out):
        g = load_gallery(d)
        index = build_index(g.z, g.ids).save(d)
        if d == old:
            registry.switch(NAME, V1, storage.join(d, MANIFEST_FILE), index, "first")
        else:
            registry.transformed(NAME, V2, H, storage.join(d, MANIFEST_FILE), index, "transformed")
    return out


def run(gallery: str, root: str, embed=None, **kw) -> dict:
    options = {"budget": 1.0, "step_fraction": 0.1, "order": "uncertainty", "seed": 7, **kw}
    return partial_backfill(gallery, embed or (lambda step, ids: new_model(ids)), Registry(root, check_index),
                            NAME, **options)


@pytest.fixture
def gallery(tmp_path):
    return make_transformed_gallery(str(tmp_path)), str(tmp_path)


def test_plan_steps():
    assert plan_steps(10, 1.0, 0.3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_steps(10, 0.5, 0.2) == [(0, 2), (2, 4), (4, 5)]
    assert plan_steps(50, 0.55, 0.1) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 28)]
    assert plan_steps(7, 1.0, 1.0) == [(0, 7)]
    assert plan_steps(3, 1.0, 0.01) == [(0, 1), (1, 2), (2, 3)]  # at least one item a step
    assert plan_steps(10, 0.0, 0.1) == [] and plan_steps(0, 1.0, 0.1) == []
    assert plan_steps(930, 0.5, 0.25) == [(0, 232), (232, 465)]  # no one-item step left by rounding each step
    for n, budget, frac in [(1000, 0.37, 0.05), (99, 1.0, 0.07), (5, 0.5, 0.5)]:
        steps = plan_steps(n, budget, frac)
        assert steps[0][0] == 0 and steps[-1][1] == round(budget * n)
        assert all(a[1] == b[0] for a, b in zip(steps, steps[1:]))
        assert all(e == round(k * frac * n) for k, (_, e) in enumerate(steps[:-1], start=1))  # no drift
        assert 0 < steps[-1][1] - steps[-1][0] <= round(frac * n) + 1
    for bad in [(10, 1.5, 0.1), (10, -0.1, 0.1), (10, 0.5, 0.0), (10, 0.5, 1.2)]:
        with pytest.raises(ValueError):
            plan_steps(*bad)


def test_uncertainty_order_is_log_var_descending_ties_by_id():
    ids = np.array([40, 7, 13, 2, 99, 5, 61], dtype=np.int64)
    log_var = np.array([0.5, 2.0, 0.5, -1.0, 2.0, 0.5, 3.0], dtype=np.float32)
    want = [i for _, i in sorted(zip(log_var.tolist(), ids.tolist()), key=lambda p: (-p[0], p[1]))]
    assert reembed_order(ids, "uncertainty", 0, log_var).tolist() == want == [61, 7, 99, 5, 13, 40, 2]
    with pytest.raises(GalleryError, match="log_var"):
        reembed_order(ids, "uncertainty", 0, None)
    with pytest.raises(GalleryError, match="duplicate"):
        reembed_order(np.array([1, 2, 1]), "random", 0)


def test_random_order_is_a_seeded_permutation():
    ids = np.arange(100, 200, dtype=np.int64)[::-1]
    a, b, c = (reembed_order(ids, "random", s) for s in (3, 3, 4))
    assert sorted(a.tolist()) == sorted(ids.tolist()) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(ids)) and not np.array_equal(a, ids)


def test_the_order_is_written_once_and_reused(gallery):
    out, _ = gallery
    order = load_order(out, "uncertainty", 0)
    lv = np.concatenate([np.load(storage.join(out, f"embeddings-{i:06d}.npz"))["log_var"] for i in range(3)])
    ids = np.concatenate([np.load(storage.join(out, f"embeddings-{i:06d}.npz"))["ids"] for i in range(3)])
    assert order.tolist() == ids[np.lexsort((ids, -lv))].tolist() and len(set(order.tolist())) == len(ids) == 50
    url = storage.join(reembed_dir(out), ORDER_FILE)
    before = storage.read_bytes(url)
    assert np.array_equal(load_order(out, "uncertainty", 5), order)  # the seed plays no part in this order
    assert storage.read_bytes(url) == before
    with pytest.raises(GalleryError, match="uncertainty order"):
        load_order(out, "random", 0)


def _reference(out: str, order: np.ndarray, end: int) -> dict[int, np.ndarray]:
    """Naively: a dict id -> vector of the transformed gallery, then the first `end` ids of the order
    re-embedded by the new model one at a time."""
    ref = {}
    for i in range(len(SHARDS)):
        with np.load(storage.join(out, f"embeddings-{i:06d}.npz")) as a:
            ref.update(zip(a["ids"].tolist(), a["z"]))
    for item in order[:end].tolist():
        ref[item] = new_model([item])[0]
    return ref


@pytest.mark.parametrize("order", ["uncertainty", "random"])
def test_gallery_state_equals_a_dict_by_id_reference(gallery, order):
    out, root = gallery
    steps = [Step(k, s, e) for k, (s, e) in enumerate(plan_steps(50, 0.55, 0.1), start=1)]
    fractions = []
    result = run(out, root, budget=0.55, order=order, on_step=lambda k, f: fractions.append((k, f)))
    assert result["embedded"] == result["indexed"] == result["registered"] == list(range(1, 7))
    assert fractions == [(s.number, s.end / 50) for s in steps]
    order_ids = load_order(out, order, 7)
    for step in [Step(0, 0, 0), *steps]:
        state = gallery_state(out, step.number)
        ref = _reference(out, order_ids, step.end)
        assert len(state.ids) == len(set(state.ids.tolist())) == len(ref) == 50
        for item, z in zip(state.ids.tolist(), state.z.numpy()):
            np.testing.assert_allclose(z, ref[item], rtol=0, atol=1e-6)
    changed = gallery_state(out, 6).z.numpy() != gallery_state(out, 0).z.numpy()
    assert changed.any(axis=1).sum() == 28  # exactly round(0.55 * 50) items re-embedded
    entry = Registry(root).gallery(NAME)
    assert entry.index == storage.join(out, "index-step-000006.json") and entry.reembedded == 28 / 50
    assert entry.gallery_model == V1 and entry.query_model == V2 and entry.transformation == H
    _check_served(entry, out, budget=0.55)


def test_the_whole_budget_makes_the_query_model_the_gallery_model_and_a_rerun_does_nothing(gallery):
    out, root = gallery
    run(out, root, order="random")
    entry = Registry(root).gallery(NAME)
    assert entry.gallery_model == entry.query_model == V2 and entry.transformation is None
    assert entry.reembedded == 1.0 and entry.index.endswith("index-step-000010.json")
    state = gallery_state(out, 10)
    np.testing.assert_allclose(state.z.numpy(), new_model(state.ids.tolist()), rtol=0, atol=1e-6)
    history = Registry(root).history(NAME)
    again = run(out, root, lambda step, ids: pytest.fail("a finished backfill embeds nothing"), order="random")
    assert again["embedded"] == again["indexed"] == again["registered"] == []
    assert Registry(root).history(NAME) == history


def test_a_corrupt_step_is_an_error_not_a_state(gallery):
    out, root = gallery
    run(out, root, budget=0.2)
    url = storage.join(reembed_dir(out), Step(2, 0, 0).file)
    data = bytearray(storage.read_bytes(url))
    data[-30] ^= 0xFF  # same size: only the sha256 tells
    storage.write_bytes_atomic(url, bytes(data))
    assert read_step_record(out, 2) is not None
    assert len(gallery_state(out, 1).ids) == 50
    with pytest.raises(GalleryError, match="sha256"):
        gallery_state(out, 2)
    with pytest.raises(GalleryError, match="sha256"):
        run(out, root, budget=0.3)  # a rerun does not serve it either
    storage.remove(storage.join(reembed_dir(out), Step(2, 0, 0).record))
    with pytest.raises(GalleryError, match="step 2 .* not complete"):
        gallery_state(out, 2)


def _check_served(entry, out: str, budget: float = 1.0) -> None:
    """The entry's index is complete and checked, holds as many vectors as the gallery, and (a step's index)
    exactly the gallery state of that step, with the matching fraction."""
    check_index(entry.index, entry.embeddings)
    directory, name = entry.index.rsplit("/", 1)
    index = GalleryIndex.load(directory, name.removesuffix(".json"))
    assert index.count == json.loads(storage.read_bytes(entry.embeddings))["count"] == 50
    if not name.startswith("index-step-"):
        assert entry.reembedded == 0.0 and name == "index.json"
        return
    k = int(name.removeprefix("index-step-").removesuffix(".json"))
    assert entry.reembedded == plan_steps(50, budget, 0.1)[k - 1][1] / 50
    state = gallery_state(out, k)
    rows = {item: row for row, item in enumerate(state.ids.tolist())}
    got = index.index.reconstruct_n(0, index.count)
    assert sorted(index.ids.tolist()) == sorted(rows)
    np.testing.assert_allclose(got, state.z.numpy()[[rows[i] for i in index.ids.tolist()]], rtol=0, atol=1e-6)


def _child_script(out: str, root: str) -> str:
    return textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {REPO!r})
        from tests.dml_core.gallery.test_partial_backfill import new_model, run

        def embed(step, ids):
            if step.number >= 4:  # the run is still going when it is killed
                threading.Event().wait()
            return new_model(ids)

        run({out!r}, {root!r}, embed)
    """)


@pytest.mark.slow
def test_a_driver_killed_after_step_two_resumes_to_the_same_gallery(tmp_path):
    out, root = make_transformed_gallery(str(tmp_path / "killed")), str(tmp_path / "killed")
    ref_out, ref_root = make_transformed_gallery(str(tmp_path / "ref")), str(tmp_path / "ref")
    run(ref_out, ref_root)
    script = tmp_path / "driver.py"
    script.write_text(_child_script(out, root))
    record = storage.join(reembed_dir(out), Step(2, 0, 0).record)
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    seen, deadline = set(), time.monotonic() + 300  # the deadline only turns a hang into a failure
    try:
        while not os.path.exists(record):
            assert proc.poll() is None, f"the driver ended before step 2: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "step 2's record never appeared"
            seen.add(_observe(root, out, seen))
            time.sleep(0.01)  # a polling interval, not a synchronisation
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    seen.add(_observe(root, out, seen))
    assert read_step_record(out, 2) is not None and read_step_record(out, 4) is None
    before = Registry(root).gallery(NAME)

    called = []
    result = run(out, root, lambda step, ids: called.append(step.number) or new_model(ids),
                 on_step=lambda k, f: seen.add(_observe(root, out, seen)))
    assert called == result["embedded"] == list(range(called[0], 11)) and called[0] in (3, 4)
    assert 1 not in result["indexed"]  # built before step 2's record was written
    assert result["registered"] == list(range(_step_of(before.index) + 1, 11))
    for k in range(1, 11):
        got, want = (np.load(storage.join(reembed_dir(d), Step(k, 0, 0).file)) for d in (out, ref_out))
        assert np.array_equal(got["ids"], want["ids"]) and np.array_equal(got["z"], want["z"])
        got, want = (read_step_record(d, k) for d in (out, ref_out))
        assert [got[f] for f in ("start", "end", "count")] == [want[f] for f in ("start", "end", "count")]
    got, want = gallery_state(out, 10), gallery_state(ref_out, 10)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.z, want.z) and torch.equal(got.labels, want.labels)
    assert len(set(got.ids.tolist())) == 50
    entry, ref_entry = Registry(root).gallery(NAME), Registry(ref_root).gallery(NAME)
    assert entry.gallery_model == entry.query_model == V2 and entry.reembedded == ref_entry.reembedded == 1.0
    fractions = [h["entry"]["reembedded"] for h in Registry(root).history(NAME) if h["event"] == "reembedded"]
    assert fractions == [k / 10 for k in range(1, 11)]  # each step registered once, only forward
    assert {"index.json", "index-step-000010.json"} <= {i.rsplit("/", 1)[-1] for i in seen}


def _step_of(index: str) -> int:
    name = index.rsplit("/", 1)[-1]
    return int(name.removeprefix("index-step-").removesuffix(".json")) if name.startswith("index-step-") else 0


def _observe(root: str, out: str, seen: set) -> str:
    """Check what the registry points at now (see `_check_served`; once per index); its index URL."""
    entry = Registry(root).gallery(NAME)
    if entry.index not in seen:
        _check_served(entry, out)
    return entry.index


class _Counting(torch.nn.Module):
    """A model that counts the items it is given."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.spec, self.seen = model, model.spec, 0

    def forward(self, images):
        self.seen += len(images)
        return self.model(images)


def test_embed_items_puts_only_the_wanted_items_through_the_model(fmnist_shards):
    from dml_core.config import config_from_dict
    from dml_core.gallery.embeddings import shard_tasks
    from dml_core.gallery.partial_backfill import embed_items
    from dml_core.training.build import build_model_from_config
    from dml_core.training.embed import embed_split

    manifest = fmnist_shards["manifest"]
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"embedding_dim": 8, "backbone_options": {"widths": [8, 16]}}})
    model = _Counting(build_model_from_config(cfg).eval())
    task = shard_tasks(manifest, "gallery")[1]
    full = embed_split(model.model, manifest, "gallery", batch_size=16)
    in_shard = full.ids.tolist()[shard_tasks(manifest, "gallery")[0].count:][:task.count]
    wanted = np.array(in_shard[::3][::-1], dtype=np.int64)
    got = embed_items(model, task, wanted, batch_size=16)
    assert model.seen == len(wanted) == int(got["count"]) and sorted(got["ids"].tolist()) == sorted(wanted.tolist())
    rows = {item: r for r, item in enumerate(full.ids.tolist())}
    np.testing.assert_allclose(got["z"], full.z.numpy()[[rows[i] for i in got["ids"].tolist()]], rtol=1e-5, atol=1e-6)
    with pytest.raises(GalleryError, match="did not yield 1 "):
        embed_items(model, task, np.append(wanted, 10 ** 9), batch_size=16)

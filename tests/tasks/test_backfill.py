"""The backfill stage on Ray: the same embeddings and ids as a single-process `embed_split`, and resumable after
a SIGKILL of the driver or of one actor, with no shard embedded twice."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.gallery.embeddings import load_gallery, read_manifest
from dml_core.models.checkpoint import save_model
from dml_core.training.build import build_model_from_config
from dml_core.training.embed import embed_split
from tasks.backfill import run_backfill
from tests.tasks._gallery_helpers import shard_gallery_dataset

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(root: str, manifest, workers: int = 2) -> dict:
    return {"run": {"name": "v1", "root": root},
            "data": {"dataset": manifest.name, "version": manifest.version, "batch_size": 8, "p": 4, "k": 2},
            "model": {"embedding_dim": 16, "backbone_options": {"widths": [8, 16]}},
            "ray": {"num_workers": workers}, "backfill": {"batch_size": 16}}


@pytest.fixture(scope="module", params=["local", "s3"])
def gallery_setup(request, tmp_path_factory):
    """A dataset whose gallery split has 8 shards of 8 images, and a checkpoint of a random model. Ray is
    started by the first backfill of each store (after the S3 server's environment is set) and stopped after."""
    import ray

    root = (str(tmp_path_factory.mktemp("backfill")) if request.param == "local"
            else request.getfixturevalue("s3_server").url("backfill"))
    manifest = shard_gallery_dataset(root)
    raw = _config(root, manifest)
    torch.manual_seed(0)
    checkpoint = storage.join(root, "runs", "v1", "checkpoints", "checkpoint_00000001")
    save_model(build_model_from_config(config_from_dict(raw)), storage.join(checkpoint, "model.pt"))
    ray.shutdown()
    yield raw, manifest, checkpoint
    ray.shutdown()


def _records(out: str) -> list[dict]:
    fs, path = storage.filesystem(out)
    fs.invalidate_cache(path)
    return [json.loads(storage.read_bytes(storage.join(out, p.rsplit("/", 1)[-1])))
            for p in fs.ls(path, detail=False) if p.endswith(".done.json")]


def test_backfill_equals_single_process_embedding(gallery_setup):
    raw, manifest, checkpoint = gallery_setup
    cfg = config_from_dict({**raw, "run": {**raw["run"], "name": "equal"}})
    result = run_backfill(cfg, checkpoint, "equal")
    assert result.embedded == result.shards == len(manifest.split("gallery").shards) == 8
    got = load_gallery(result.url)
    want = embed_split(checkpoint, manifest, "gallery", batch_size=16)
    assert got.ids.tolist() == want.ids.tolist()  # shard order, each id once
    assert len(set(got.ids.tolist())) == manifest.split("gallery").count == result.manifest["count"]
    torch.testing.assert_close(got.z, want.z, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.labels, want.labels)
    again = run_backfill(cfg, checkpoint, "equal")  # complete: nothing to do
    assert again.embedded == 0 and load_gallery(again.url).ids.tolist() == got.ids.tolist()


def test_a_pool_kept_between_backfills_embeds_with_each_calls_checkpoint(gallery_setup):
    """The same actors embed with checkpoint A, then with another checkpoint B, then with B rewritten in place
    (a new file tag): each gallery equals a single-process embedding with the checkpoint it was given."""
    from tasks.backfill import EmbedPool

    raw, manifest, first = gallery_setup
    if not storage.is_local(raw["run"]["root"]):
        pytest.skip("reloading a model does not depend on the storage: the local run covers it")
    cfg = config_from_dict({**raw, "run": {**raw["run"], "name": "pooled"}})
    second = storage.join(raw["run"]["root"], "runs", "pooled", "checkpoints", "checkpoint_00000002")
    with EmbedPool(cfg) as pool:
        for seed, (checkpoint, version) in enumerate([(first, "a"), (second, "b"), (second, "b2")], start=1):
            if checkpoint == second:  # a new model, then the same URL rewritten with other weights
                torch.manual_seed(seed)
                save_model(build_model_from_config(cfg), storage.join(second, "model.pt"))
            actors = list(pool.actors)
            got = load_gallery(run_backfill(cfg, checkpoint, version, pool=pool).url)
            assert pool.actors == actors  # the same actors every time
            want = embed_split(checkpoint, manifest, "gallery", batch_size=16)
            torch.testing.assert_close(got.z, want.z, rtol=1e-5, atol=1e-6)


def _driver_script(raw: dict, checkpoint: str, version: str, kill_after: int | None = None) -> str:
    return textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from dml_core.config import config_from_dict
        from tasks.backfill import run_backfill

        def on_shard(n, record):
            if n == {kill_after}:
                os.kill(os.getpid(), signal.SIGKILL)

        run_backfill(config_from_dict({raw!r}), {checkpoint!r}, {version!r}, on_shard=on_shard)
    """)


def test_killed_driver_resumes_without_recomputing(gallery_setup, tmp_path):
    raw, manifest, checkpoint = gallery_setup
    if storage.is_local(raw["run"]["root"]):
        pytest.skip("resuming reads the same records on local disk and S3: the S3 run covers both")
    script = tmp_path / "driver.py"
    script.write_text(_driver_script(raw, checkpoint, "killed", kill_after=3))
    marker = uuid.uuid4().hex  # in the environment of every process of the driver's Ray
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "DML_TEST_DRIVER": marker},
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # the driver's machine is lost with it: its Ray processes die too (left alone, an actor busy when its driver
    # died may still commit a shard while the records are listed below)
    deadline = time.monotonic() + 30
    while pids := _pids_with(f"DML_TEST_DRIVER={marker}", "environ"):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes {pids} of the killed driver's Ray survive SIGKILL"
        time.sleep(0.2)
    cfg = config_from_dict(raw)
    out = storage.join(cfg.run.root, "galleries", manifest.name, "killed")
    first = _records(out)
    assert 3 <= len(first) < 8 and not storage.exists(storage.join(out, "manifest.json"))
    result = run_backfill(cfg, checkpoint, "killed")
    assert result.embedded == 8 - len(first)
    records = _records(out)
    assert len(records) == 8 and sorted(r["index"] for r in records) == list(range(8))
    assert {r["attempt"] for r in first} & {r["attempt"] for r in records} == {first[0]["attempt"]}
    reference = load_gallery(run_backfill(cfg, checkpoint, "equal").url)
    got = load_gallery(result.url)
    assert got.ids.tolist() == reference.ids.tolist()
    assert torch.equal(got.z, reference.z)


def test_a_killed_driver_group_leaves_no_process_and_no_later_record(gallery_setup, tmp_path):
    """SIGKILL of the driver's process group (a killed `dml backfill`) while its actors embed: it reaches every
    process of its Ray, none outlives it and no shard record appears after it (issue 23: two actors, each in a
    group of its own, lived on with parent pid 1 and wrote 4 more records)."""
    raw, manifest, checkpoint = gallery_setup
    if not storage.is_local(raw["run"]["root"]):
        pytest.skip("what outlives a driver does not depend on the storage: the local run covers it")
    script = tmp_path / "driver.py"
    script.write_text(_driver_script(raw, checkpoint, "group-killed"))
    token, log = uuid.uuid4().hex, tmp_path / "driver.log"  # the token is in the environment of all its Ray
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "DML_TEST_DRIVER": token},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    out = storage.join(raw["run"]["root"], "galleries", manifest.name, "group-killed")
    while not (storage.exists(out) and _records(out)):  # the first shard is done: the actors are embedding
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = sorted(r["index"] for r in _records(out))
    assert len(at_kill) < 8, "the backfill ended before the kill: nothing was left to write"
    missed = [pid for pid in _pids_with(f"DML_TEST_DRIVER={token}", "environ") if _group(pid) not in (None, proc.pid)]
    assert not missed, f"processes {missed} of the driver's Ray were outside its group: the kill missed them"
    deadline = time.monotonic() + 30
    while pids := _pids_with(f"DML_TEST_DRIVER={token}", "environ"):
        assert time.monotonic() < deadline, f"processes {pids} of the killed driver's Ray outlive it"
        time.sleep(0.1)
    assert sorted(r["index"] for r in _records(out)) == at_kill


def _group(pid: int) -> int | None:
    """The process group of `pid`, None once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(pid)
    return None


def _pids_with(fragment: str, where: str = "cmdline") -> list[int]:
    """Processes whose command line (or environment) contains `fragment` (Ray titles an actor's process
    `ray::<Class>`)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/{where}", "rb") as f:
                if fragment.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_killed_actor_is_restarted_and_its_shard_retried(gallery_setup):
    raw, manifest, checkpoint = gallery_setup
    if not storage.is_local(raw["run"]["root"]):
        pytest.skip("an actor's restart does not depend on the storage: the local run covers it")
    cfg = config_from_dict(raw)
    killed = []

    def kill_one_actor(n, record):
        if killed:
            return
        for pid in _pids_with("EmbedActor"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            time.sleep(0.5)
            return

    result = run_backfill(cfg, checkpoint, "actor-killed", on_shard=kill_one_actor)
    assert killed, "no EmbedActor process found to kill"
    assert result.embedded == 8 and read_manifest(result.url)["count"] == manifest.split("gallery").count
    reference = load_gallery(run_backfill(cfg, checkpoint, "equal").url)
    got = load_gallery(result.url)
    assert got.ids.tolist() == reference.ids.tolist() and torch.equal(got.z, reference.z)


def test_a_corrupt_gallery_shard_is_named_or_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    manifest = shard_gallery_dataset(root)
    raw = _config(root, manifest)
    checkpoint = storage.join(root, "ckpt")
    save_model(build_model_from_config(config_from_dict(raw)), storage.join(checkpoint, "model.pt"))
    bad = storage.local_path(manifest.shard_urls("gallery")[2])
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)  # mid-member: not a readable tar to its end
    with pytest.raises(Exception, match=os.path.basename(bad)):
        run_backfill(config_from_dict(raw), checkpoint, "raise")
    skipping = config_from_dict({**raw, "data": {**raw["data"], "on_error": "skip"}})
    result = run_backfill(skipping, checkpoint, "skip")
    assert result.embedded == 8 and 0 < result.manifest["skipped"] < 8
    assert result.manifest["count"] + result.manifest["skipped"] == manifest.split("gallery").count
    assert len(load_gallery(result.url).ids) == result.manifest["count"]

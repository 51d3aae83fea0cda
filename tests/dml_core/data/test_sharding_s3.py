"""Sharding onto S3 (a SeaweedFS server), read back with boto3 independently of storage.py/s3fs."""
import time

import pytest

from dml_core.data.manifest import Manifest, ManifestError
from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import ImageFolderSource
from tests.dml_core.data.readback import read_dataset
from tests.dml_core.data.test_sharding import check_round_trip, make_image_folder


def _boto3(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


def _listing(client, prefix):
    objs = client.list_objects_v2(Bucket="dml", Prefix=prefix).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"], o["Size"]) for o in objs}


@pytest.mark.slow
def test_round_trip_and_idempotency_on_s3(s3_server, tmp_path):
    files = make_image_folder(tmp_path / "src")
    root = s3_server.url("sharding-test")
    m = shard_dataset(ImageFolderSource(str(tmp_path / "src")), root, "toy", seed=1, max_shard_samples=4)
    client = _boto3(s3_server)  # read back with boto3, independently of storage.py / s3fs
    prefix = f"sharding-test/datasets/toy/{m.version}/"
    samples = read_dataset(m, lambda shard: client.get_object(Bucket="dml", Key=prefix + shard)["Body"].read())
    check_round_trip(m, samples, files)
    before = _listing(client, "sharding-test/")
    names = {k.rsplit("/", 1)[1] for k in before}
    assert names == {s.name for sp in m.splits.values() for s in sp.shards} | {"manifest.json"}
    assert Manifest.read(root, "toy", m.version).verify("full") == m
    time.sleep(1.1)  # LastModified has 1 s resolution
    assert shard_dataset(ImageFolderSource(str(tmp_path / "src")), root, "toy", seed=1, max_shard_samples=4,
                         verify="sha256") == m
    assert _listing(client, "sharding-test/") == before


@pytest.mark.slow
def test_damaged_shard_on_s3_is_named_and_rewritten(s3_server, tmp_path):
    make_image_folder(tmp_path / "src", n_classes=4, per_class=3)
    root = s3_server.url("damage-test")
    m = shard_dataset(ImageFolderSource(str(tmp_path / "src")), root, "toy")
    client = _boto3(s3_server)
    name = m.split("gallery").shards[0].name
    key = f"damage-test/datasets/toy/{m.version}/{name}"
    good = client.get_object(Bucket="dml", Key=key)["Body"].read()
    client.put_object(Bucket="dml", Key=key, Body=good[:-2048])
    with pytest.raises(ManifestError, match=name):
        m.verify()
    shard_dataset(ImageFolderSource(str(tmp_path / "src")), root, "toy")
    assert client.get_object(Bucket="dml", Key=key)["Body"].read() == good
    m.verify("full")


@pytest.mark.slow
def test_fmnist_s3_shards_fixture(fmnist_s3_shards, fmnist_shards):
    m = fmnist_s3_shards["manifest"]
    assert fmnist_s3_shards["root"].startswith("s3://") and m.url == fmnist_s3_shards["url"]
    assert Manifest.read(fmnist_s3_shards["root"], "fmnist-tiny").verify("full") == m
    local = fmnist_shards["manifest"]
    assert m.splits == local.splits and m.version == local.version  # same bytes on both stores
    assert m.num_ids == local.num_ids == 400


def _s3fs(server):
    import s3fs

    return s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": server.endpoint_url, "region_name": "us-east-1"})


@pytest.mark.slow
def test_s3_killed_during_sharding_leaves_no_manifest_and_a_rerun_completes(tmp_path, monkeypatch):
    """A server of its own (the session's must live on), SIGKILLed while a sharding process writes to it,
    restarted on the same data directory: no manifest was written, and a re-run completes and verifies."""
    import os
    import signal
    import subprocess
    import sys

    from dml_core.data.sources import SyntheticSource
    from infra.seaweedfs import SeaweedS3
    from tests.dml_core.data.test_sharding import KILL_SCRIPT, REPO

    server = SeaweedS3(bucket="dml", workdir=str(tmp_path / "weed")).start()
    root = server.url("killed")
    try:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, root, str(tmp_path)], cwd=REPO,
                                stderr=subprocess.PIPE, env={**os.environ, **server.client_env(),
                                                             "DML_STORAGE_RETRY_SECONDS": "5"})  # a short outage window
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():  # 3 train shards are on S3 and the writer waits
            assert proc.poll() is None, "sharding ended before the server could be killed"
            assert time.monotonic() < deadline, "sharding did not reach its 50th train sample within 120 s"
            time.sleep(0.05)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, "sharding did not fail when its storage died"
        server.start()  # same data directory and ports
        fs = _s3fs(server)
        (version_dir,) = fs.glob("dml/killed/datasets/big/*")
        at_kill = {p.rsplit("/", 1)[1] for p in fs.ls(version_dir)}
        assert "manifest.json" not in at_kill and at_kill, err.decode()[-2000:]
        for k, v in server.client_env().items():
            monkeypatch.setenv(k, v)
        src = SyntheticSource(num_classes=10, per_class=150, kind="images", image_size=(48, 48), noise=0.3, seed=1)
        m = shard_dataset(src, root, "big", max_shard_samples=15, eval_class_fraction=0.3)
        assert m.url == f"s3://{version_dir}"
        assert Manifest.read(root, "big").verify("full") == m
        listed = {s.name for sp in m.splits.values() for s in sp.shards} | {"manifest.json"}
        fs.invalidate_cache()
        assert {p.rsplit("/", 1)[1] for p in fs.ls(version_dir)} == listed
        assert len(at_kill) < len(listed) - 1  # it really was killed half-way
    finally:
        server.stop()

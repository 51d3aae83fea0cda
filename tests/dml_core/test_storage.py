"""`dml_core.storage`: local helpers, and S3 connections that survive forked reader workers (issue 10, section 4)."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time

import fsspec
import pytest

from dml_core import storage

READ_TIMEOUT = 4.0  # s3fs's default is 15 s; short, so a stall shows up quickly


def test_local_paths(tmp_path):
    url = storage.join(str(tmp_path), "a", "b.bin")
    storage.write_bytes_atomic(url, b"xyz")
    assert storage.is_local(url) and storage.is_local("file://" + url) and not storage.is_local("s3://b/k")
    assert storage.local_path("file://" + url) == url
    assert storage.exists(url) and storage.read_bytes(url) == b"xyz"
    assert os.listdir(tmp_path / "a") == ["b.bin"]  # no temporary file left beside it


def test_fork_guard_restores_gc_state_in_parent():
    assert storage._fork_guard_installed
    before = gc.get_freeze_count()
    ctx = mp.get_context("fork")
    q = ctx.SimpleQueue()
    p = ctx.Process(target=_child_frozen_check, args=(q,))
    p.start()
    frozen_in_child = q.get()
    p.join(30)
    assert p.exitcode == 0
    assert frozen_in_child > 0  # everything inherited is outside the child's collector
    assert gc.get_freeze_count() == before  # and the parent collects as before


def _child_frozen_check(q):
    q.put(gc.get_freeze_count())


def _s3fs(endpoint: str):
    """An S3FileSystem with a short read timeout and no retries (the stall would be one whole timeout)."""
    return fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint},
                             config_kwargs={"read_timeout": READ_TIMEOUT, "connect_timeout": READ_TIMEOUT})


def _forked_reader(endpoint: str, path: str) -> None:
    """What a DataLoader worker does: its own S3 client (fsspec drops the inherited instance cache), a read,
    and a full collection, which frees whatever of the parent's objects the child no longer references."""
    fs = _s3fs(endpoint)
    with fs.open(path, "rb") as f:
        assert f.read() == b"x" * 1000
    gc.collect()


def _timed_read(endpoint: str, path: str) -> float:
    """Read `path` through the process's cached S3FileSystem, holding no reference to it afterwards (as
    `storage.open_read` callers do: only fsspec's instance cache keeps it)."""
    t = time.perf_counter()
    assert _s3fs(endpoint).cat_file(path) == b"x" * 1000
    return time.perf_counter() - t


@pytest.mark.slow
def test_parent_s3_read_after_forked_reader_does_not_stall(s3_server):
    """Regression: a forked reader's GC closed the parent's pooled S3 connection through the inherited event
    loop (EPOLL_CTL_DEL on the parent's epoll set), so the parent's next read waited out the read timeout."""
    url = s3_server.url("fork-guard-test/fork.bin")
    storage.write_bytes_atomic(url, b"x" * 1000)
    endpoint, path = s3_server.endpoint_url, url[len("s3://"):]
    ctx = mp.get_context("fork")
    for attempt in range(3):
        _timed_read(endpoint, path)  # leaves a pooled keep-alive connection in the parent
        p = ctx.Process(target=_forked_reader, args=(endpoint, path))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        dt = _timed_read(endpoint, path)
        assert dt < READ_TIMEOUT / 4, f"parent's S3 read after a forked reader took {dt:.2f} s (attempt {attempt})"


@pytest.mark.slow
def test_reader_pass_then_parent_read_is_fast(s3_server, fmnist_s3_shards):
    """The same through the real readers: 2 forked DataLoader workers, then an S3 read in the parent."""
    from dml_core.data.eval_reader import EvalReader
    from dml_core.data.layout import SPLITS

    m = fmnist_s3_shards["manifest"]
    endpoint, url = s3_server.endpoint_url, s3_server.url("fork-guard-test/fork2.bin")
    storage.write_bytes_atomic(url, b"x" * 1000)
    for _ in range(2):
        _timed_read(endpoint, url[len("s3://"):])
        reader = EvalReader.from_manifest(m, SPLITS, rank=0, world_size=1, batch_size=64, num_workers=2)
        assert sum(len(b) for b in reader) == m.count
        del reader
        assert _timed_read(endpoint, url[len("s3://"):]) < READ_TIMEOUT / 4

"""Storage through faults (issue 11): a short S3 outage is ridden out, a long one fails naming the URL,
errors that cannot heal are not retried, and a full disk leaves no torn file and says what did not fit."""
from __future__ import annotations

import os
import threading
import time

import pytest

from dml_core import storage


def _restart_after(server, seconds: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), server.restart()), daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_reads_writes_and_listings_ride_out_a_short_outage(s3_outage_server):
    url = s3_outage_server.url("retry-test/a.bin")
    storage.write_bytes_atomic(url, b"before")
    s3_outage_server.kill()
    t0 = time.monotonic()
    restart = _restart_after(s3_outage_server, 4)
    with storage.retry_window(90):
        assert storage.read_bytes(url) == b"before"
        waited = time.monotonic() - t0
        storage.write_bytes_atomic(storage.join(url + "-dir", "b.bin"), b"after")
        assert storage.list_names(url + "-dir") == ["b.bin"]
        with storage.open_read(storage.join(url + "-dir", "b.bin")) as f:
            assert f.read() == b"after"
    restart.join()
    assert waited >= 4  # it really waited for the server to come back


@pytest.mark.slow
def test_an_outage_longer_than_the_window_fails_naming_the_url(s3_outage_server):
    url = s3_outage_server.url("retry-test/long.bin")
    storage.write_bytes_atomic(url, b"x")
    s3_outage_server.kill()
    t0 = time.monotonic()
    with storage.retry_window(3), pytest.raises(storage.StorageUnavailableError,
                                                match=r"unreachable for 3 s \(storage.retry_seconds\) at "
                                                      r"s3://dml/retry-test/long.bin"):
        storage.read_bytes(url)
    assert 3 <= time.monotonic() - t0 < 30


@pytest.mark.slow
def test_a_missing_object_is_not_retried(s3_outage_server):
    t0 = time.monotonic()
    with storage.retry_window(60), pytest.raises(FileNotFoundError):
        storage.read_bytes(s3_outage_server.url("retry-test/no-such-object"))
    assert time.monotonic() - t0 < 5


def test_the_retry_window_travels_in_the_environment(monkeypatch):
    from dml_core import retry

    monkeypatch.delenv(retry.RETRY_ENV, raising=False)
    assert retry.retry_seconds() == 120.0
    storage.use_retry_seconds(7)
    assert os.environ[retry.RETRY_ENV] == "7.0" and retry.retry_seconds() == 7.0
    with storage.retry_window(0):
        assert retry.retry_seconds() == 0.0
    assert retry.retry_seconds() == 7.0


def test_a_full_disk_names_path_and_space_and_leaves_no_torn_file(tmpfs):
    root = tmpfs("1m")
    target = os.path.join(root, "run", "state.pt")
    storage.write_bytes_atomic(os.path.join(root, "run", "small.bin"), b"ok")
    with pytest.raises(storage.StorageFullError) as err:
        storage.write_bytes_atomic(target, os.urandom(2 << 20))
    message = str(err.value)
    assert err.value.errno == 28 and target in message and "2,097,152 bytes to write" in message
    free = int(message.split(" bytes free")[0].rsplit(" ", 1)[-1].replace(",", ""))
    assert 0 <= free < 1 << 20
    assert sorted(os.listdir(os.path.join(root, "run"))) == ["small.bin"]  # no torn file, no temporary one


@pytest.mark.slow
def test_a_shard_read_through_a_long_outage_is_a_storage_error_never_a_skipped_shard(s3_outage_server):
    from dml_core.data.shard_stream import ErrorLog, iter_samples

    url = s3_outage_server.url("retry-test/train-000000.tar")
    s3_outage_server.kill()
    errors = ErrorLog()
    with storage.retry_window(1), pytest.raises(storage.StorageUnavailableError, match="train-000000.tar"):
        list(iter_samples([url], on_error="skip", errors=errors))
    assert errors.shards == []

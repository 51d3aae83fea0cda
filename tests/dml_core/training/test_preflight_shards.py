"""The pre-flight compares every shard's size with the manifest (one listing of the dataset folder) and
names every bad shard before any worker starts; with data.on_error: skip it names them and goes on."""
import os
import uuid

import pytest

from dml_core import storage
from dml_core.config import ConfigError
from dml_core.training.preflight import preflight
from tests.dml_core.data._shards import append_sample, cut_at_sample, make_sample, truncate, write_dataset
from tests.tasks._train_helpers import small_config

NAME, VERSION = "toy", "0123456789ab"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def damaged(request, tmp_path):
    """A dataset with one shard cut at a member boundary, one cut mid-member and one with a sample appended
    (and one intact), on local disk or S3; yields (data root, {bad shard name: its message part})."""
    root = str(tmp_path / "data")
    write_dataset(root, {"train": (range(0, 6), 8, 4), "eval": (range(6, 9), 4, 1)})
    d = f"{root}/datasets/{NAME}/{VERSION}"
    sizes = {n: os.path.getsize(f"{d}/{n}") for n in os.listdir(d)}
    cut = cut_at_sample(f"{d}/train-000000.tar", 5)
    truncate(f"{d}/train-000001.tar", 0.5)
    # large enough to outgrow the tar's padding to 10 KiB records (a small one can keep the size: the readers
    # catch that one, by its sample count)
    append_sample(f"{d}/eval-000000.tar", make_sample(99999, 6, "eval", size=128))
    bad = {"train-000000.tar": f"has {cut} bytes, manifest says {sizes['train-000000.tar']} (truncated?)",
           "train-000001.tar": f"has {sizes['train-000001.tar'] // 2} bytes, manifest says "
                               f"{sizes['train-000001.tar']} (truncated?)",
           "eval-000000.tar": f"has {os.path.getsize(f'{d}/eval-000000.tar')} bytes, manifest says "
                              f"{sizes['eval-000000.tar']} (appended to?)"}
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        root = s3.url(f"preflight-{uuid.uuid4().hex[:8]}")
        fs, path = storage.filesystem(f"{root}/datasets/{NAME}/{VERSION}")
        fs.put(f"{d}/", path, recursive=True)
    return root, bad


def _config(tmp_path, root, on_error):
    shards = {"name": NAME, "version": VERSION, "root": root}
    return small_config(str(tmp_path / "runs"), shards, "preflight", steps=4, data={"on_error": on_error})


def test_preflight_names_every_bad_shard_and_both_sizes(tmp_path, damaged):
    root, bad = damaged
    with pytest.raises(ConfigError) as e:
        preflight(_config(tmp_path, root, "raise"))
    msg = str(e.value)
    assert msg.startswith(f"data: 3 shard(s) of {root}/datasets/{NAME}/{VERSION} do not match the manifest")
    for name, part in bad.items():
        assert f"shard {root}/datasets/{NAME}/{VERSION}/{name} {part}" in msg
    assert "train-000002.tar" not in msg and "data.on_error: skip" in msg


def test_preflight_with_skip_names_the_bad_shards_and_goes_on(tmp_path, damaged, capsys):
    root, bad = damaged
    manifest = preflight(_config(tmp_path, root, "skip"))
    assert manifest.url == f"{root}/datasets/{NAME}/{VERSION}"
    out = capsys.readouterr().out
    assert "data.on_error=skip: 3 shard(s) do not match the manifest" in out
    assert all(name in out for name in bad)


def test_data_on_error_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"data.on_error must be one of \['raise', 'skip'\], got 'ignore'"):
        _config(tmp_path, str(tmp_path), "ignore")

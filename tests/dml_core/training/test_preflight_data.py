"""The pre-flight's dataset checks against the manifest: `data.train_classes` and the P x K class count."""
import pytest

from dml_core.config import ConfigError, config_from_dict
from dml_core.data.manifest import Manifest
from dml_core.training.preflight import check_data
from tests.dml_core.data._shards import write_dataset


def _cfg(**data):
    return config_from_dict({"data": {"p": 2, "k": 2, "batch_size": 4, **data}})


def test_train_classes_limits_the_classes_p_may_use(tmp_path):
    write_dataset(str(tmp_path), {"train": ((3, 1, 8, 5), 4, 2)})
    manifest = Manifest.read(str(tmp_path), "toy", "0123456789ab")
    check_data(_cfg(train_classes=2), manifest)
    check_data(_cfg(p=4, batch_size=8), manifest)
    with pytest.raises(ConfigError, match=r"data\.p=3 .* has only 2 classes with at least 2 samples among its "
                                          r"first 2 \(data\.train_classes\)"):
        check_data(_cfg(p=3, batch_size=6, train_classes=2), manifest)
    with pytest.raises(ConfigError, match=r"data\.train_classes=5, but the split has 4 classes \(the training split"):
        check_data(_cfg(train_classes=5), manifest)

"""Stage flows that must stop before any compute."""
from __future__ import annotations

import os

import pytest

from dml_core.config import ConfigError
from tests.flows._flow_helpers import write_config


@pytest.mark.parametrize("field, setting", [("loss.bct.old_checkpoint", "loss.bct={old_checkpoint: gallery}"),
                                            ("train.init_checkpoint", "train.init_checkpoint=gallery")])
def test_the_gallery_model_without_a_gallery_model_names_the_field(prefect_api, tmp_path, field, setting):
    from flows.stages import train_flow

    config = write_config(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"{field}: gallery needs a gallery model.*'fmnist-tiny'"):
        train_flow(config, [setting])
    assert not os.path.exists(tmp_path / "storage" / "runs")  # nothing trained

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
    with pytest.raises(ConfigError, match=rf"{field}: gallery needs a gallery model.*'glyphs-tiny'"):
        train_flow(config, [setting])
    assert not os.path.exists(tmp_path / "storage" / "runs")  # nothing trained


def test_an_error_that_would_recur_is_not_retried(prefect_api, tmp_path):
    """No dataset sharded yet: the train task fails at its pre-flight with a ConfigError, once (its retry
    would wait 10 s and fail the same way)."""
    import time

    from flows.stages import train_flow

    config = write_config(str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="glyphs-tiny/deadbeef0000/manifest.json not found"):
        train_flow(config, ["data.version=deadbeef0000"])
    assert time.monotonic() - t0 < 10


def test_the_errors_that_recur_are_the_ones_not_retried():
    from types import SimpleNamespace

    from dml_core.models.checkpoint import CheckpointError
    from dml_core.training.lease import LeaseHeldError
    from tasks.workflow import would_recur

    def recurs(error) -> bool:
        return not would_recur(None, None, SimpleNamespace(data=error))

    assert recurs(LeaseHeldError("held by another driver")) and recurs(ConfigError("bad"))
    assert recurs(CheckpointError("checkpoint model.pt is truncated or not a checkpoint"))
    assert not recurs(OSError("connection reset"))

"""A training shard cut at a sample boundary stops `run_training` in the pre-flight, naming the shard,
before Ray starts: nothing is retried, nothing is trained."""
from __future__ import annotations

import time

import pytest
import ray

from dml_core.config import ConfigError
from dml_core.training.metrics_log import read_metrics
from tasks.train import run_training
from tests.dml_core.training.test_skipped import short_shard  # noqa: F401 (a fixture)
from tests.tasks._train_helpers import small_config
from tests.tasks.test_train import _assert_nothing_trained

pytestmark = pytest.mark.slow


def test_a_short_shard_fails_the_run_before_ray_starts(tmp_path, short_shard):  # noqa: F811
    cfg = small_config(str(tmp_path / "runs"), short_shard, "short", steps=6)
    ray_was_up = ray.is_initialized()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"data: 1 shard\\(s\\) of .* do not match the manifest: shard "
                                          f"{short_shard['bad']} has \\d+ bytes, manifest says \\d+ \\(truncated\\?\\)"):
        run_training(cfg)
    assert time.monotonic() - t0 < 20 and ray.is_initialized() == ray_was_up
    _assert_nothing_trained(cfg)


def test_skip_trains_through_and_counts_over_both_workers(tmp_path, short_shard, capsys):  # noqa: F811
    cfg = small_config(str(tmp_path / "runs"), short_shard, "skip", steps=4, data={"on_error": "skip"},
                       train={"checkpoint_every": 2})
    result = run_training(cfg)
    assert result.final["step"] == 4 and result.skipped["skipped_shards"] >= 1
    assert result.metrics["skipped_shards"] == result.skipped["skipped_shards"]
    out = capsys.readouterr().out
    assert f"{short_shard['bad']} has " in out  # the pre-flight named it
    assert result.skipped["samples_from_skipped_shards"] == 27 * result.skipped["skipped_shards"]  # its 27 each
    assert (f"data.on_error=skip: the run skipped {result.skipped['skipped_shards']} shard read(s) (after "
            f"{result.skipped['samples_from_skipped_shards']} of their samples were read and trained on) and 0 "
            f"sample(s); the messages are in {cfg.run_dir}/metrics.jsonl") in out
    records = [r for r in read_metrics(f"{cfg.run_dir}/metrics.jsonl") if r.get("event") == "skipped"]
    assert records[-1]["skipped_shards"] == result.skipped["skipped_shards"]
    assert all(short_shard["bad"] in msg for r in records for msg in r["shards"])

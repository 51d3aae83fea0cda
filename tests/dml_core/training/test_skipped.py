"""`fit` with data.on_error: skip on a short training shard: it trains through, and the skipped shard reads
(and the samples read from them before the shard was found short) are counted in metrics.jsonl (naming the
shard), in fit's result and on the console, and carried across a resume; with raise (the default) the same
shard stops training naming it."""
import os
import shutil

import pytest

from dml_core.data.manifest import Manifest
from dml_core.data.shard_stream import ShardReadError
from dml_core.training.loop import Worker, fit
from dml_core.training.metrics_log import read_metrics
from tests.dml_core.data._shards import cut_at_sample
from tests.dml_core.training.test_loop import keep_checkpoints
from tests.tasks._train_helpers import small_config

pytestmark = pytest.mark.slow


@pytest.fixture
def short_shard(tmp_path, fmnist_shards):
    """A copy of the fmnist-tiny dataset whose second training shard was cut at a sample boundary."""
    root = str(tmp_path / "data")
    src = fmnist_shards["manifest"].url
    shutil.copytree(src, f"{root}/datasets/{fmnist_shards['name']}/{fmnist_shards['version']}")
    shards = {**fmnist_shards, "root": root}
    m = Manifest.read(root, shards["name"], shards["version"])
    shard = m.split("train").shards[1]
    cut_at_sample(f"{m.url}/{shard.name}", 27)
    return {**shards, "manifest": m, "bad": f"{m.url}/{shard.name}", "count": shard.count}


def _cfg(tmp_path, shards, steps, on_error):
    return small_config(str(tmp_path / "runs"), shards, "skip", steps=steps, data={"on_error": on_error},
                        train={"checkpoint_every": 3}, ray={"num_workers": 1})


def test_skip_counts_in_metrics_result_and_console_and_across_a_resume(tmp_path, short_shard, capsys):
    cfg = _cfg(tmp_path, short_shard, 6, "skip")
    first = fit(cfg, short_shard["manifest"], Worker(report=keep_checkpoints(cfg.run_dir, [])))
    assert first["step"] == 6 and first["skipped_shards"] >= 1 and first["skipped_samples"] == 0
    assert first["samples_from_skipped_shards"] == 27 * first["skipped_shards"]  # each read trained on its 27
    records = [r for r in read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl")) if r.get("event") == "skipped"]
    assert records and records[-1]["skipped_shards"] == first["skipped_shards"]
    assert records[-1]["samples_from_skipped_shards"] == first["samples_from_skipped_shards"]
    expected = (f"{short_shard['bad']}: it holds 27 samples, the manifest says {short_shard['count']} (truncated?); "
                "the 27 sample(s) read from it before were kept")
    assert all(expected in msg for r in records for msg in r["shards"])
    assert "of their samples were read and trained on" in capsys.readouterr().out

    second = fit(_cfg(tmp_path, short_shard, 9, "skip"), short_shard["manifest"],
                 Worker(report=keep_checkpoints(cfg.run_dir, [])))
    assert second["start_step"] == 6 and second["skipped_shards"] > first["skipped_shards"]
    assert second["samples_from_skipped_shards"] == 27 * second["skipped_shards"]  # carried across the resume


def test_raise_stops_training_naming_the_shard(tmp_path, short_shard):
    cfg = _cfg(tmp_path, short_shard, 6, "raise")
    with pytest.raises(ShardReadError, match=f"{short_shard['bad']}: it holds 27 samples"):
        fit(cfg, short_shard["manifest"], Worker())

"""Every experiment of EXPERIMENTS.md on tiny settings (`python -m experiments.run --tiny`), through the real
`dml` commands, Ray and Prefect: the tables agree with what the runs left on storage, read back independently."""
from __future__ import annotations

import json
import os

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, prefect_api):
    from experiments.run import EXPERIMENTS, main

    root, out = tmp_path_factory.mktemp("exp-root"), tmp_path_factory.mktemp("exp-out")
    timings = main(["--tiny", "--seeds", "1", "--root", str(root), "--out", str(out)])
    assert set(timings) == set(EXPERIMENTS)
    return root, out


def _result(out, name: str) -> dict:
    with open(out / f"{name}.json") as f:
        return json.load(f)


def _run_file(root, run: str, name: str):
    return root / "runs" / run / name


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_tcm_tables_match_each_trials_report_and_metrics_log(tiny):
    root, out = tiny
    result = _result(out, "tcm")
    assert result["commands"][0].startswith("dml shard ") and result["commands"][1].startswith("dml sweep ")
    assert set(result["datasets"]) == {"fmnist"}  # tiny mode only loads the font-glyph config
    for name, data in result["datasets"].items():
        assert len(data["trials"]) == 2  # one seed, two arms
        for trial in data["trials"]:
            report = json.loads(_run_file(root, trial["run"], "sweep_report.json").read_text())
            arm = "with TCM" if trial["values"]["loss.tcm"]["lambda_pos"] else "without TCM"
            assert data["summary"][arm]["opis"]["mean"] == pytest.approx(report["opis"]["opis"])
            assert data["summary"][arm]["recall_at_1"]["mean"] == pytest.approx(report["retrieval"]["recall_at_1"])
            assert data["summary"][arm]["floor_map_at_r"]["mean"] == pytest.approx(report["floor"]["map_at_r"])
            lines = _run_file(root, trial["run"], "metrics.jsonl").read_text().splitlines()
            steps = [json.loads(line) for line in lines if '"step"' in line and '"event"' not in line]
            assert data["hard_pairs"][arm]["hard_neg"] == [float(s["tcm/hard_neg"]) for s in steps]
            saved = yaml.safe_load(_run_file(root, trial["run"], "config.yaml").read_text())
            assert saved["loss"]["tcm"]["lambda_neg"] == trial["values"]["loss.tcm"]["lambda_neg"]
        (w2, h2), (w1, _) = _png_size(out / f"tcm_{name}_utility.png"), _png_size(out / f"tcm_{name}_hard_pairs.png")
        assert w2 > 1.5 * h2 and w1 > 0  # the two utility panels side by side


def test_batch_size_grid_trains_each_loss_at_each_batch(tiny):
    root, out = tiny
    result = _result(out, "batch_size")
    seen = set()
    for trial in result["trials"]:
        saved = yaml.safe_load(_run_file(root, trial["run"], "config.yaml").read_text())
        assert (saved["loss"]["base"], saved["data"]["batch_size"]) == (trial["values"]["loss.base"],
                                                                       trial["values"]["data.batch_size"])
        assert saved["loss"]["objective"] == "self_supervised"
        seen.add((saved["loss"]["base"], saved["data"]["batch_size"]))
        point = result["recall_at_1"][saved["loss"]["base"]][str(saved["data"]["batch_size"])]
        assert point["mean"] == pytest.approx(trial["recall_at_1"])
    assert seen == {("info_nce", 16), ("decomposable", 16)}


def test_the_claims_comparison_pairs_b_with_2b():
    from experiments.batch_size import b_vs_2b

    summary = {loss: {str(b): {"mean": float(b) + (loss == "info_nce") / 10} for b in (32, 64, 128)}
               for loss in ("info_nce", "decomposable")}
    assert b_vs_2b(summary, (32, 64, 128)) == [
        {"b": 32, "decomposable": 32.0, "info_nce_2b": 64.1, "info_nce_b": 32.1},
        {"b": 64, "decomposable": 64.0, "info_nce_2b": 128.1, "info_nce_b": 64.1}]


def test_compat_runs_train_against_the_right_old_models(tiny):
    root, out = tiny
    result = _result(out, "compat")
    (seed,) = result["per_seed"]
    config = {run: yaml.safe_load(_run_file(root, f"{run}-s0", "config.yaml").read_text())
              for run in ("old", "new-bct", "chain")}
    assert config["old"]["data"]["train_classes"] == 20 and config["new-bct"]["data"]["train_classes"] is None
    assert f"{root}/runs/old-s0/checkpoints/" in config["new-bct"]["loss"]["bct"]["old_checkpoint"]
    assert f"{root}/runs/new-bct-s0/checkpoints/" in config["chain"]["train"]["init_checkpoint"]
    assert f"{root}/runs/old-s0/checkpoints/" in config["chain"]["loss"]["bct"]["old_checkpoint"]
    assert config["new-bct"]["model"]["backbone_options"]["widths"] == [32, 64, 128]
    metrics = json.loads(_run_file(root, "chain-s0", "evaluation/metrics.json").read_text())  # the last evaluation
    assert seed["chain vs new-bct"]["nfr"] == metrics["nfr"]
    assert seed["chain vs new-bct"]["map_at_r"]["new_old"] == metrics["compatibility"]["map_at_r"]["new_old"]
    assert set(seed) == {"new-bct vs old", "chain vs old", "chain vs new-bct"}


def test_memory_search_doubles_until_a_limit_and_names_the_largest_fit(tiny):
    _, out = tiny
    result = _result(out, "memory")
    for method, points in result["points"].items():
        batches = [p["batch"] for p in points]
        assert batches == [256 * 2 ** i for i in range(len(batches))]
        fits = [p["batch"] for p in points if p.get("peak_bytes", float("inf")) <= result["budget_bytes"]]
        assert result["largest"][method] == (max(fits) if fits else None)
    plain = [p for p in result["points"]["plain"] if "peak_bytes" in p]
    assert plain[-1]["peak_bytes"] > plain[0]["peak_bytes"]  # plain backprop's memory grows with the batch


def test_scale_measures_the_setups_and_counts_bytes(tiny):
    root, out = tiny
    result = _result(out, "scale")
    assert set(result["measured"]) == {"1 worker", "2 workers"}  # the two-node run is left out of tiny mode
    two = result["measured"]["2 workers"]
    saved = yaml.safe_load(_run_file(root, two["run"], "config.yaml").read_text())
    assert saved["ray"]["num_workers"] == 2
    dim, batch = saved["model"]["embedding_dim"], 2 * saved["data"]["batch_size"]
    assert two["bytes"]["gather"] == 2 * batch * (dim + 2) * 4 / 2  # forward gather + backward reduce-scatter
    assert two["bytes"]["gradients"] == 2 * result["params"] * 4 / 2
    assert result["measured"]["1 worker"]["bytes"] == {"gather": 0.0, "gradients": 0.0}
    for p in result["projection"]:
        assert p["step_s"] == pytest.approx(p["compute_s"] + p["gather_s"] + p["gradients_s"])

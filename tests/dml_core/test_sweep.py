"""Grid expansion and trial naming of `dml sweep` (dml_core/sweep.py) against a naive product."""
from __future__ import annotations

import itertools
import json
import statistics

import pytest

from dml_core.config import ConfigError, config_from_dict, parse_overrides
from dml_core.sweep import aggregate, expand_grid, parse_grid, table_markdown, trial_row


def test_grid_values_are_read_as_yaml_and_brackets_keep_their_commas():
    grid = parse_grid(["loss.tau=0.05,1e-1", "loss.base=info_nce,decomposable",
                       "model.backbone_options={widths: [8, 16]},{widths: [16,32]}", "loss.tcm=null,{m_pos: 0.8}"])
    assert grid == {"loss.tau": [0.05, 0.1], "loss.base": ["info_nce", "decomposable"],
                    "model.backbone_options": [{"widths": [8, 16]}, {"widths": [16, 32]}],
                    "loss.tcm": [None, {"m_pos": 0.8}]}


def test_expansion_is_the_cartesian_product_times_seeds():
    grid = parse_grid(["loss.tau=0.05,0.1,0.2", "data.batch_size=32,64", "loss.base=info_nce,decomposable"])
    trials = expand_grid(grid, seeds=3, first_seed=7)
    naive = [(tau, b, base, seed) for tau, b, base in itertools.product([0.05, 0.1, 0.2], [32, 64],
                                                                          ["info_nce", "decomposable"])
             for seed in (7, 8, 9)]
    got = [(t.values["loss.tau"], t.values["data.batch_size"], t.values["loss.base"], t.seed) for t in trials]
    assert got == naive
    assert len({t.key for t in trials}) == len(trials) == 36
    assert trials[0].key == "tau0.05-batch_size32-baseinfo_nce-seed7"


def test_trial_overrides_give_its_values_seed_and_own_run_name():
    (trial,) = expand_grid(parse_grid(["loss.tcm={m_pos: 0.8}"]), seeds=1, first_seed=3)
    cfg = config_from_dict(parse_overrides(trial.overrides("base")))
    assert cfg.loss.tcm.m_pos == 0.8 and cfg.train.seed == 3
    assert cfg.run.name == "base-tcmm_pos_0.8-seed3" and "/" not in cfg.run.name


def test_no_grid_is_one_trial_per_seed_and_repeated_last_parts_use_the_whole_key():
    assert [t.key for t in expand_grid({}, seeds=2)] == ["seed0", "seed1"]
    trials = expand_grid(parse_grid(["loss.tcm.m_pos=0.8", "model.m_pos=1"]), seeds=1)  # names only, no config
    assert trials[0].key == "loss.tcm.m_pos0.8-model.m_pos1-seed0"


@pytest.mark.parametrize("items, needle", [
    (["loss.tau"], "expected key.path=v1,v2"),
    (["loss.tau="], "expected key.path=v1,v2"),
    (["loss.tau=0.1", "loss.tau=0.2"], "given twice"),
    (["train.seed=1,2"], "--seeds"),
    (["loss.tau=0.1,0.1"], "repeated"),
    (["loss.tau=[1,"], "not valid YAML"),
])
def test_bad_grid_items_are_named(items, needle):
    with pytest.raises(ConfigError, match="--grid|override") as e:
        parse_grid(items)
    assert needle in str(e.value)


def test_values_that_slug_alike_and_no_seeds_are_refused():
    with pytest.raises(ConfigError, match="equal trial names"):
        expand_grid(parse_grid(["run.root=a/b,a_b"]), seeds=1)
    with pytest.raises(ConfigError, match="--seeds"):
        expand_grid({}, seeds=0)


def test_table_rows_and_mean_std_over_seeds():
    trials = expand_grid(parse_grid(["loss.tau=0.1,0.2"]), seeds=2)
    recalls = [0.5, 0.7, 0.2, 0.4]
    floor = {"recall_at_k": {"1": 0.3}, "map_at_r": 0.1}
    rows = [trial_row(t, f"r-{t.key}", {"retrieval": {"recall_at_1": r, "map_at_r": r / 2}, "floor": floor,
                                         "opis": {"opis": 0.01, "eps_opis": 0.02}, "meta": {"checkpoint": "c"}})
            for t, r in zip(trials, recalls)]
    assert rows[0]["recall_at_1"] == 0.5 and rows[0]["checkpoint"] == "c" and rows[0]["recall_at_5"] is None
    assert (rows[0]["floor_recall_at_1"], rows[0]["floor_map_at_r"]) == (0.3, 0.1)
    agg = aggregate(rows)
    assert [a["values"] for a in agg] == [{"loss.tau": 0.1}, {"loss.tau": 0.2}]
    assert agg[0]["recall_at_1"]["mean"] == pytest.approx(0.6)
    assert agg[1]["recall_at_1"]["std"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    md = table_markdown("s", rows)
    assert "| tau0.1-seed0 | 0 | 0.5000 | 0.3000 | - | 0.2500 | 0.1000 |" in md and "0.6000 ± 0.1414" in md
    json.dumps(agg)

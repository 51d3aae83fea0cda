"""Which config changes a resumed run refuses (model, loss, data, optimisation) and which it allows (length,
logging, placement, storage), against the saved config as `tasks/train.py` writes it."""
from __future__ import annotations

import pytest
import yaml

from dml_core import storage
from dml_core.config import config_from_dict
from dml_core.training.resume_config import RESUMABLE_CHANGES, config_changes, set_aside


def saved_and_new(**changes) -> tuple[dict, dict]:
    base = {"run": {"name": "r", "root": "/tmp/x"}, "model": {"embedding_dim": 32, "backbone_options": {"widths": [8, 16]}}}
    saved = yaml.safe_load(config_from_dict(base).to_yaml())  # as read back from config.yaml
    new = config_from_dict(base)
    for path, value in changes.items():
        section, key = path.split("__")
        setattr(getattr(new, section), key, value)
    return saved, new.to_dict()


def test_a_changed_model_loss_or_data_field_is_listed_with_both_values():
    saved, new = saved_and_new(model__embedding_dim=48, loss__tau=0.2, data__augment=True, train__lr=0.01)
    assert config_changes(saved, new) == [("data.augment", False, True), ("model.embedding_dim", 32, 48),
                                          ("loss.tau", 0.1, 0.2), ("train.lr", 0.001, 0.01)]


def test_nested_options_are_compared_field_by_field():
    saved, new = saved_and_new(model__backbone_options={"widths": [8, 32], "norm": "group"})
    assert config_changes(saved, new) == [("model.backbone_options.widths", [8, 16], [8, 32]),
                                          ("model.backbone_options.norm", "<absent>", "group")]


def test_length_logging_placement_and_storage_may_change():
    saved, new = saved_and_new(train__steps=900, train__log_every=1, train__checkpoint_every=7, train__keep_best=9,
                               run__lease_seconds=5.0, data__loader_workers=3, loss__tile_size=64)
    new["ray"]["num_workers"], new["storage"]["endpoint_url"] = 8, "http://elsewhere:8333"
    assert config_changes(saved, new) == []
    assert "train.steps" in RESUMABLE_CHANGES and "model.embedding_dim" not in RESUMABLE_CHANGES


def test_a_field_missing_from_an_older_saved_config_counts_as_its_default():
    saved, new = saved_and_new()
    del saved["loss"]["gamma"], saved["run"]["lease_seconds"]
    assert config_changes(saved, new) == []
    new["loss"]["gamma"] = 0.5
    assert config_changes(saved, new) == [("loss.gamma", 0.1, 0.5)]


def test_the_story_of_runs_may_change():
    saved, new = saved_and_new()
    new["runs"] = [{"name": "v1", "set": {}}, {"name": "v2", "set": {"train.steps": 5}}]
    assert config_changes(saved, new) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_set_aside_moves_everything_but_the_kept_names(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_server").url(f"aside-{tmp_path.name}")
    run_dir = storage.join(root, "runs", "r")
    files = {"config.yaml": b"a", "metrics.jsonl": b"b", "checkpoints/checkpoint_00000004/model.pt": b"c",
             "lease.json": b"d"}
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(run_dir, name), data)
    moved = set_aside(run_dir, keep=("lease.json",))
    assert moved.startswith(storage.join(run_dir, "replaced-"))
    assert storage.list_names(run_dir) == ["lease.json", moved.rsplit("/", 1)[-1]]
    for name, data in files.items():
        kept_or_moved = run_dir if name == "lease.json" else moved
        assert storage.read_bytes(storage.join(kept_or_moved, name)) == data
    assert set_aside(run_dir, keep=("lease.json",)) is None  # nothing left to move (earlier set-asides stay)

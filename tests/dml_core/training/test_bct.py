"""BCT prototypes of a run: two ranks, each embedding its share of the training split and all-reducing the
sums, give the per-class means of a plain float64 loop over the whole split."""
import pytest
import torch

from dml_core.config import config_from_dict
from dml_core.models.registry import build_model
from dml_core.training.bct import bct_prototypes
from dml_core.training.embed import embed_split
from dml_core.training.state import save_state

pytestmark = pytest.mark.slow


def _config(old_checkpoint: str) -> dict:
    return {"model": {"embedding_dim": 8}, "loss": {"bct": {"old_checkpoint": old_checkpoint}},
            "data": {"eval_batch_size": 16}}


def _rank_prototypes(rank, world, raw_cfg, manifest):
    return bct_prototypes(config_from_dict(raw_cfg), manifest, rank, world)


def test_prototypes_of_two_ranks_equal_a_naive_loop_over_the_split(tmp_path, fmnist_shards, gloo):
    torch.manual_seed(0)
    old = build_model("small_cnn", embedding_dim=8, image_size=28, widths=[8, 16])
    save_state(str(tmp_path / "old"), old, None, None, None, step=0, config={})
    manifest, raw = fmnist_shards["manifest"], _config(str(tmp_path / "old"))

    protos = gloo(_rank_prototypes, 2, raw, manifest)
    torch.testing.assert_close(protos[0], protos[1], rtol=0, atol=0)  # every rank holds the same matrix

    z, labels, _ = embed_split(str(tmp_path / "old"), manifest, "train")
    expected = torch.zeros(manifest.num_train_labels, 8, dtype=torch.float64)
    for c in labels.unique().tolist():
        rows = [zi.double() / zi.double().norm() for zi, li in zip(z, labels) if li == c]
        mean = sum(rows) / len(rows)
        expected[c] = mean / mean.norm()
    torch.testing.assert_close(protos[0].double(), expected, rtol=1e-5, atol=1e-6)
    assert protos[0].shape == (manifest.num_train_labels, 8)

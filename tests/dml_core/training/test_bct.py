"""Old-model prototypes: the summed (distributed) path equals `class_prototypes` on all embeddings."""
import torch

from dml_core.data.shard_stream import Batch
from dml_core.losses.bct import class_prototypes
from dml_core.models.registry import build_model
from dml_core.training.bct import old_embedding_dim, old_prototypes, prototype_sums, prototypes_from_sums
from dml_core.training.embed import embed_batches
from dml_core.training.state import save_state


def batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        labels = torch.randint(0, 4, (10,), generator=g)  # labels 0..3 of 6 classes: 4, 5 have no samples
        out.append(Batch(torch.rand(10, 1, 8, 8, generator=g), labels, torch.arange(10) + 10 * b))
    return out


def test_prototypes_split_over_workers_equal_the_single_process_ones(tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=8, image_size=8)
    save_state(str(tmp_path), model, None, None, None, step=0, config={})
    assert old_embedding_dim(str(tmp_path)) == 8

    part_a, part_b = batches(1), batches(2)
    z, labels, _ = embed_batches(model, part_a + part_b)
    expected = class_prototypes(z[labels < 4], labels[labels < 4], 4)

    sa, ca = prototype_sums(model, part_a, 6)
    sb, cb = prototype_sums(model, part_b, 6)
    protos = prototypes_from_sums(sa + sb, ca + cb)  # what the all-reduce of two workers gives
    torch.testing.assert_close(protos[:4], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(protos[4:], torch.zeros(2, 8))  # classes without samples: zero rows

    single = old_prototypes(str(tmp_path), part_a + part_b, 6)
    torch.testing.assert_close(single, protos)

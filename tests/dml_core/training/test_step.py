"""One training step: the update equals a hand-written forward/backward/AdamW step; with GradCache too;
a non-finite loss stops before the update."""
import pytest
import torch

from dml_core.losses.info_nce import InfoNCE, info_nce_loss
from dml_core.models.registry import build_model
from dml_core.training.step import train_step


def setup():
    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=8, image_size=8, norm="group")
    return model, torch.optim.SGD(model.parameters(), lr=1e-2)


def data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 3


@pytest.mark.parametrize("chunk", [None, 5])
def test_step_matches_manual_update(chunk):
    x, y = data()
    ref, ref_opt = setup()
    ref_opt.zero_grad()
    info_nce_loss(ref(x), y, tau=0.1).backward()
    ref_opt.step()

    model, opt = setup()
    loss, gc = InfoNCE(tau=0.1), None
    if chunk:
        from dml_core.gradcache import GradCache

        gc = GradCache(model, loss, chunk)
    stats = train_step(model, loss, x, y, None, opt, grad_cache=gc)
    assert stats["lr"] == 1e-2 and stats["anchors_with_positive"] == 12.0
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_raises_before_update():
    class Bad(InfoNCE):
        def forward(self, z, labels, ids=None):
            return super().forward(z, labels) * float("nan")

    model, opt = setup()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    with pytest.raises(FloatingPointError, match="step 7"):
        train_step(model, Bad(), x, y, None, opt, step=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _count_training_step(rank, world, kind):
    from dml_core.losses import TCM, DecomposableLoss, DistributedLoss, InfoNCE
    from dml_core.training.loop import global_mean
    from tests.dml_core.losses.test_collectives import counting

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model("small_cnn", embedding_dim=8, image_size=8,
                                                                  norm="group"))
    base = InfoNCE() if kind == "info_nce" else DecomposableLoss(num_samples=24)
    loss = DistributedLoss(base + TCM())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = data()
    with counting() as counts:
        stats = train_step(model, loss, x, y, torch.arange(12) + 12 * rank, opt)
        global_mean(stats, world, torch.device("cpu"))
    return dict(counts)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["info_nce", "decomposable"])
def test_one_training_step_makes_at_most_two_gathers_and_no_object_collective(gloo, kind):
    """The Python-level collectives of one DDP step (`train_step` + the stats mean); DDP's own gradient
    all-reduce runs in its C++ reducer, outside this count."""
    from tests.dml_core.losses.test_collectives import OBJECT_COLLECTIVES

    for counts in gloo(_count_training_step, 2, kind):
        gathers = sum(n for name, n in counts.items() if "gather" in name)
        assert 1 <= gathers <= 2, counts
        assert not OBJECT_COLLECTIVES & counts.keys(), counts


@pytest.mark.parametrize("loss, hint", [
    ({"base": "arcface", "s": 30}, "likely causes: train.lr=0.001 or loss.s=30 too high, or the data"),
    ({"base": "proxy_anchor", "bct": {"old_checkpoint": "/old"}},
     "likely causes: train.lr=0.001 or loss.alpha=32 too high, loss.bct.tau_bct=0.05 too low, or the data"),
])
def test_the_nan_hint_of_a_proxy_loss_names_its_scale_not_tau(loss, hint):
    from dml_core.config import config_from_dict
    from dml_core.training.step import nan_suspects

    assert nan_suspects(config_from_dict({"loss": loss})) == hint

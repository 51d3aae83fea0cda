"""METHODS.md 1.2: with 2 and 4 gloo ranks under DDP and `DistributedLoss`, the averaged parameter gradient
equals the single-process gradient of the global-batch loss, for InfoNCE (dense and tiled) and the CLIP loss
(alone, and with a learnable logit scale in a sum with TCM, whose gradient `average_loss_grads` averages)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dml_core.distributed import average_loss_grads
from dml_core.losses import TCM, ClipLoss, DistributedLoss, InfoNCE, clip_loss, info_nce_loss
from dml_core.losses.info_nce import dense_info_nce_rows
from tests.conftest import run_gloo
from tests.dml_core.losses.test_info_nce import assert_close_rel

LOCAL_BATCH, IN_DIM, OUT_DIM, TAU = 4, 5, 3, 0.2


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN_DIM, OUT_DIM), nn.Linear(IN_DIM, OUT_DIM)

    def forward(self, x_a, x_b):
        return self.a(x_a), self.b(x_b)


def make_models():
    torch.manual_seed(0)
    return nn.Linear(IN_DIM, OUT_DIM).double(), TwoTowers().double()


def make_batch(world_size):
    """Global inputs and labels whose anchors-with-positive are spread unevenly over the ranks."""
    n = LOCAL_BATCH * world_size
    g = torch.Generator().manual_seed(world_size)
    x = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    x_b = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    labels = torch.arange(100, 100 + n)
    labels[1], labels[3] = labels[0], labels[2]  # rank 0: four anchors with a positive
    labels[LOCAL_BATCH] = labels[2]  # rank 1: one, matching rank 0
    labels[-1] = labels[LOCAL_BATCH + 1]  # last rank: one; ranks in between: none
    return x, x_b, labels


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).detach().clone()


def to_numpy(result):
    """Tensors sent back through a torch multiprocessing queue need their sender alive: send arrays."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


def clip_with_learned_scale():
    return (ClipLoss(TAU, learn_scale=True) + 0.5 * TCM(m_pos=0.5, m_neg=0.0)).double()


def pair_layout(towers, x_a, x_b):
    """One rank's two-tower batch as the loss takes it: [z_a; z_b], labels = pair ids (global)."""
    return torch.cat(towers(x_a, x_b))


def ddp_worker(rank, world_size, x, x_b, labels):
    from torch.nn.parallel import DistributedDataParallel as DDP

    linear, towers = make_models()
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out = {}
    ddp = DDP(linear)
    for name, loss in [("dense", InfoNCE(TAU)), ("tiled", InfoNCE(TAU, tile_size=3, tiled_above=0))]:
        ddp.zero_grad()
        loss = DistributedLoss(loss)
        loss(ddp(x[part]), labels[part]).backward()
        out[name] = flat_grad(linear)
        out[name + "_stats"] = dict(loss.stats)
    ddp_towers = DDP(towers)
    pairs = torch.arange(x.shape[0])[part].repeat(2)
    DistributedLoss(ClipLoss(TAU))(pair_layout(ddp_towers, x[part], x_b[part]), pairs, pairs).backward()
    out["clip"] = flat_grad(towers)
    ddp_towers.zero_grad()
    learned = clip_with_learned_scale()
    loss = DistributedLoss(learned)
    loss(pair_layout(ddp_towers, x[part], x_b[part]), pairs).backward()
    out["logit_scale_share"] = learned.terms[0].logit_scale.grad.clone()
    average_loss_grads(loss)
    out["clip_learned"] = torch.cat([flat_grad(towers), learned.terms[0].logit_scale.grad.flatten()])
    return to_numpy(out)


def single_process_grads(x, x_b, labels):
    linear, towers = make_models()
    info_nce_loss(linear(x), labels, TAU).backward()
    clip_loss(*towers(x, x_b), TAU).backward()
    want_clip = flat_grad(towers)
    towers.zero_grad()
    learned = clip_with_learned_scale()
    pairs = torch.arange(x.shape[0]).repeat(2)
    learned(pair_layout(towers, x, x_b), pairs).backward()
    want_learned = torch.cat([flat_grad(towers), learned.terms[0].logit_scale.grad.flatten()])
    return flat_grad(linear), want_clip, want_learned


def mean_of_rank_means_grad(x, labels, world_size):
    """What a rank-local mean (no ddp_scale correction) would give after DDP averaging."""
    linear, _ = make_models()
    rows = dense_info_nce_rows(*(2 * [nn.functional.normalize(linear(x), dim=1)]), labels, labels, 0, TAU)
    valid = torch.tensor([(labels == y).sum() > 1 for y in labels])
    total = 0
    for r in range(world_size):
        part = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        total = total + rows[part].sum() / valid[part].sum().clamp(min=1) / world_size
    total.backward()
    return flat_grad(linear)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def runs(request):
    world_size = request.param
    x, x_b, labels = make_batch(world_size)
    return world_size, run_gloo(ddp_worker, world_size, x, x_b, labels), single_process_grads(x, x_b, labels), \
        (x, labels)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["dense", "tiled"])
def test_info_nce_ddp_gradient_equals_single_process(runs, path):
    world_size, results, (want, _, _), (x, labels) = runs
    stats = [r[path + "_stats"] for r in results]
    assert [s["tiled"] for s in stats] == [float(path == "tiled")] * world_size
    local_valid = [s["anchors_with_positive_local"] for s in stats]
    assert len(set(local_valid)) > 1  # the uneven case the scale must handle
    assert world_size == 2 or 0.0 in local_valid  # a rank with no anchor of its own still sends gradient
    assert all(s["anchors_with_positive"] == sum(local_valid) for s in stats)
    for r in results:  # DDP leaves the same averaged gradient on every rank
        assert_close_rel(torch.from_numpy(r[path]), want, 1e-10)
    assert not torch.allclose(mean_of_rank_means_grad(x, labels, world_size), want, rtol=1e-3)


@pytest.mark.slow
def test_clip_ddp_gradient_equals_single_process(runs):
    world_size, results, (_, want, want_learned), _ = runs
    assert abs(float(want_learned[-1])) > 1e-3  # the logit scale has a gradient worth checking
    for r in results:
        assert_close_rel(torch.from_numpy(r["clip"]), want, 1e-10)
        assert_close_rel(torch.from_numpy(r["clip_learned"]), want_learned, 1e-10)
        # the logit scale's gradient alone, relative to itself
        assert_close_rel(torch.from_numpy(r["clip_learned"][-1:]), want_learned[-1:], 1e-10)
    # without average_loss_grads each rank would keep the gradient of its own share
    assert any(abs(float(r["logit_scale_share"]) - float(want_learned[-1])) > 1e-6 for r in results)

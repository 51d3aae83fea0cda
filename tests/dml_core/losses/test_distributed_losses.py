"""METHODS.md 1.2 through `DistributedLoss`: with 2 and 4 gloo processes under DDP, the averaged parameter
gradient equals the single-process global-batch gradient, step after step, for every loss and their sums;
the decomposable state and the class proxies (METHODS 2.1, their gradients averaged by `average_loss_grads`)
are identical on every rank and equal to the single-process ones."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dml_core.distributed import average_loss_grads, is_distributed
from dml_core.losses import (BCT, TCM, ArcFace, CosFace, DecomposableLoss, DistributedLoss, InfoNCE, OldEmbeddingTable,
                             PositiveCongruent, ProxyAnchor)
from tests.conftest import run_gloo
from tests.dml_core.losses.test_info_nce import assert_close_rel

D_IN, D_OUT, NUM_SAMPLES, NUM_CLASSES, BATCH, STEPS = 5, 4, 20, 3, 8, 3
KINDS = ["info_nce", "info_nce_tiled", "tcm", "decomposable", "decomposable_sampled", "bct", "info_nce+tcm",
         "decomposable+tcm", "info_nce+tcm+bct", "decomposable+tcm+bct", "decomposable_tiled+tcm_tiled",
         "decomposable_tiled_seen", "pc", "info_nce+tcm+bct+pc",
         "arcface", "cosface", "proxy_anchor", "proxy_anchor+tcm", "arcface+tcm+bct"]
PROXY_CLASSES = NUM_CLASSES + 1  # one proxy no batch has a positive for


def _make_loss(kind: str) -> nn.Module:
    w_old = nn.functional.normalize(torch.randn(NUM_CLASSES, D_OUT, generator=torch.Generator().manual_seed(5),
                                                dtype=torch.float64), dim=1)
    terms = {
        "info_nce": lambda: InfoNCE(tau=0.2),
        "info_nce_tiled": lambda: InfoNCE(tau=0.2, tile_size=3, tiled_above=0),
        "tcm": lambda: TCM(m_pos=0.5, m_neg=0.0),
        "decomposable": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2),
        "decomposable_sampled": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2, gamma_shape=3.0, seed=7),
        "bct": lambda: BCT(w_old, tau_bct=0.3),
        "pc": lambda: PositiveCongruent(w_old, _old_table(), alpha=0.5, beta=2.0, tau_pc=0.3),
        "decomposable_tiled": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2, tile_size=3, tiled_above=0),
        "tcm_tiled": lambda: TCM(m_pos=0.5, m_neg=0.0, tile_size=3, tiled_above=0),
        "decomposable_tiled_seen": lambda: _seen(DecomposableLoss(NUM_SAMPLES, tau=0.2, tile_size=3, tiled_above=0)),
        "arcface": lambda: ArcFace(PROXY_CLASSES, D_OUT, s=8.0, seed=1).double(),
        "cosface": lambda: CosFace(PROXY_CLASSES, D_OUT, s=8.0, seed=2).double(),
        "proxy_anchor": lambda: ProxyAnchor(PROXY_CLASSES, D_OUT, alpha=8.0, seed=3).double(),
    }
    loss = None
    for name in kind.split("+"):
        loss = terms[name]() if loss is None else loss + terms[name]()
    return loss


def _old_table() -> OldEmbeddingTable:
    """Old embeddings of every sample id: near their class prototype for some ids (old model right)."""
    g = torch.Generator().manual_seed(6)
    ids = torch.arange(NUM_SAMPLES)
    return OldEmbeddingTable(torch.randn(NUM_SAMPLES, D_OUT, generator=g, dtype=torch.float64), ids)


def _seen(loss: DecomposableLoss) -> DecomposableLoss:
    """A state in which every id has been seen: the tiled path's single-pass steady state."""
    loss.seen.fill_(True)
    loss.zbar.copy_(torch.linspace(1.5, 3.0, NUM_SAMPLES, dtype=torch.float64))
    return loss


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, NUM_SAMPLES, (BATCH,), generator=g)
        ids[3] = ids[6]  # a duplicate id split across ranks
        out.append((torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64), ids % NUM_CLASSES, ids))
    return out


def _train(rank: int, world_size: int, init_state: dict, kinds: list[str]) -> dict:
    """Run STEPS SGD steps per loss kind on this rank's slice; return grads, loss values, stats and state."""
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in kinds:
            encoder = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
            encoder.load_state_dict(init_state)
            model = nn.parallel.DistributedDataParallel(encoder) if is_distributed() else encoder
            inner = _make_loss(kind)
            loss_fn = DistributedLoss(inner)
            opt = torch.optim.SGD([*model.parameters(), *inner.parameters()], lr=0.5)
            grads, values, stats = [], [], []
            for x, labels, ids in _batches():
                part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
                opt.zero_grad()
                loss = loss_fn(model(x[part]), labels[part], ids[part])
                loss.backward()
                average_loss_grads(inner)  # the proxies' gradients, as the training loop does
                own = [p.grad.flatten() for p in inner.parameters()]
                grads.append(torch.cat([encoder.weight.grad.flatten(), encoder.bias.grad, *own]).numpy().copy())
                values.append(float(loss.detach()))
                stats.append(dict(loss_fn.stats))
                opt.step()
            # numpy, not tensors: torch's queue would share tensor storage with a process that is exiting
            state = {k: v.numpy().copy() for k, v in loss_fn.state_dict().items()}
            assert list(state) == list(inner.state_dict()), "DistributedLoss must save the inner loss's keys"
            results[kind] = dict(grads=grads, values=values, stats=stats, state=state)
    results["future_warnings"] = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    return results


@pytest.fixture(scope="module")
def single_process():
    init = nn.Linear(D_IN, D_OUT, dtype=torch.float64).state_dict()
    return init, _train(0, 1, init, KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_gradients_and_state_equal_single_process(single_process, world_size):
    init, single = single_process
    per_rank = run_gloo(_train, world_size, init, KINDS)
    for kind in KINDS:
        want = single[kind]
        for step in range(STEPS):
            for r, got in enumerate(per_rank):
                assert_close_rel(torch.from_numpy(got[kind]["grads"][step]), torch.from_numpy(want["grads"][step]),
                                 1e-10)
            # each rank returns its share: their average is the global loss
            mean_value = sum(got[kind]["values"][step] for got in per_rank) / world_size
            assert mean_value == pytest.approx(want["values"][step], rel=1e-10), kind
            # global stats are the same on every rank; local ones (a term's share, BCT's mean) average to it
            for key, value in want["stats"][step].items():
                if not key.endswith("_local"):
                    mean_stat = sum(got[kind]["stats"][step][key] for got in per_rank) / world_size
                    assert mean_stat == pytest.approx(value, rel=1e-9), (kind, key)
        for name, value in want["state"].items():
            for r, got in enumerate(per_rank):
                np.testing.assert_array_equal(got[kind]["state"][name], per_rank[0][kind]["state"][name],
                                              err_msg=f"{kind} {name} rank {r}")
            np.testing.assert_allclose(per_rank[0][kind]["state"][name], value, rtol=1e-12, atol=0)
    assert all(got["future_warnings"] == [] for got in per_rank)


def test_single_process_reference_is_not_trivial(single_process):
    _, single = single_process
    for kind in KINDS:
        assert all(float(abs(g).max()) > 1e-3 for g in single[kind]["grads"]), kind
    assert all(s["hard_pos"] > 0 and s["hard_neg"] > 0 for s in single["tcm"]["stats"])
    assert all(s["tcm/hard_pos"] > 0 and s["tcm/hard_neg"] > 0 for s in single["decomposable+tcm"]["stats"])
    assert int(single["decomposable"]["state"]["seen"].sum()) > BATCH
    assert single["info_nce_tiled"]["stats"][0]["tiled"] == 1.0
    tiled = single["decomposable_tiled+tcm_tiled"]["stats"][0]
    assert tiled["decomposable/tiled"] == 1.0 and tiled["tcm/tiled"] == 1.0
    assert all(s["single_pass"] == 1.0 for s in single["decomposable_tiled_seen"]["stats"])
    for got, want in zip(single["decomposable_tiled+tcm_tiled"]["grads"], single["decomposable+tcm"]["grads"]):
        assert_close_rel(torch.from_numpy(got), torch.from_numpy(want), 1e-10)  # the tiled path is exact
    assert all(0 < s["old_right"] < 1 for s in single["pc"]["stats"])  # both focal weights occur
    for kind in ("arcface", "cosface", "proxy_anchor", "proxy_anchor+tcm", "arcface+tcm+bct"):
        assert any(name.endswith("proxies") for name in single[kind]["state"]), kind  # saved with the loss
        assert all(float(abs(g[-PROXY_CLASSES * D_OUT:]).max()) > 1e-3 for g in single[kind]["grads"]), kind
    assert all(0 < s["proxies_with_positive"] < PROXY_CLASSES for s in single["proxy_anchor"]["stats"])
    assert single["future_warnings"] == []

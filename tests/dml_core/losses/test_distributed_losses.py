"""METHODS.md 1.2 for TCM, the decomposable loss and BCT: with 2 and 4 gloo processes under DDP, the
averaged parameter gradient equals the single-process global-batch gradient, step after step, and the
decomposable state is identical on every rank and equal to the single-process state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dml_core.distributed import is_distributed
from dml_core.losses.bct import BCT
from dml_core.losses.decomposable import DecomposableLoss
from dml_core.losses.tcm import TCM
from tests.conftest import run_gloo

D_IN, D_OUT, NUM_SAMPLES, NUM_CLASSES, BATCH, STEPS = 5, 4, 20, 3, 8, 3
KINDS = ["tcm", "decomposable", "decomposable_sampled", "bct", "combined"]


def _make_loss(kind: str) -> nn.Module:
    w_old = nn.functional.normalize(torch.randn(NUM_CLASSES, D_OUT, generator=torch.Generator().manual_seed(5),
                                                dtype=torch.float64), dim=1)
    tcm = TCM(m_pos=0.5, m_neg=0.0)
    return {
        "tcm": lambda: tcm,
        "decomposable": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2),
        "decomposable_sampled": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2, gamma_shape=3.0, seed=7),
        "bct": lambda: BCT(w_old, tau_bct=0.3),
        "combined": lambda: DecomposableLoss(NUM_SAMPLES, tau=0.2) + tcm + BCT(w_old, tau_bct=0.3),
    }[kind]()


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, NUM_SAMPLES, (BATCH,), generator=g)
        ids[3] = ids[6]  # a duplicate id split across ranks
        out.append((torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64), ids % NUM_CLASSES, ids))
    return out


def _train(rank: int, world_size: int, init_state: dict, kinds: list[str]) -> dict:
    """Run STEPS SGD steps per loss kind on this rank's slice; return grads, loss values and state."""
    results = {}
    for kind in kinds:
        encoder = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
        encoder.load_state_dict(init_state)
        model = nn.parallel.DistributedDataParallel(encoder) if is_distributed() else encoder
        loss_fn = _make_loss(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        grads, values, stats = [], [], []
        for x, labels, ids in _batches():
            part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
            opt.zero_grad()
            loss = loss_fn(model(x[part]), labels[part], ids[part])
            loss.backward()
            grads.append(torch.cat([encoder.weight.grad.flatten(), encoder.bias.grad]).numpy().copy())
            values.append(float(loss.detach()))
            # global statistics only ("X/loss" of a combined loss is this rank's share)
            stats.append({k: v for k, v in loss_fn.stats.items() if not k.endswith("/loss")})
            opt.step()
        # numpy, not tensors: torch's queue would share tensor storage with a process that is exiting
        buffers = {k: v.numpy().copy() for k, v in loss_fn.state_dict().items() if k.endswith(("zbar", "seen", "step"))}
        results[kind] = dict(grads=grads, values=values, stats=stats, buffers=buffers)
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
                np.testing.assert_allclose(got[kind]["grads"][step], want["grads"][step], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{kind}, step {step}, rank {r}")
            # each rank returns its share: their average is the global loss
            mean_value = sum(got[kind]["values"][step] for got in per_rank) / world_size
            assert mean_value == pytest.approx(want["values"][step], rel=1e-9), kind
            assert per_rank[0][kind]["stats"][step] == pytest.approx(want["stats"][step], rel=1e-9), kind
        for name, value in want["buffers"].items():
            for r, got in enumerate(per_rank):
                np.testing.assert_array_equal(got[kind]["buffers"][name], per_rank[0][kind]["buffers"][name],
                                              err_msg=f"{kind} {name} rank {r}")
            np.testing.assert_allclose(per_rank[0][kind]["buffers"][name], value, rtol=1e-12, atol=0)


def test_single_process_reference_is_not_trivial(single_process):
    _, single = single_process
    for kind in KINDS:
        assert all(float(abs(g).max()) > 1e-3 for g in single[kind]["grads"]), kind
    tcm_stats = single["tcm"]["stats"]
    assert all(s["hard_pos"] > 0 and s["hard_neg"] > 0 for s in tcm_stats)
    assert int(single["decomposable"]["buffers"]["seen"].sum()) > BATCH

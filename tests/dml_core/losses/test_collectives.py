"""What one loss step communicates: through `DistributedLoss` one all-gather of the batch (plus the
decomposable loss's Zhat gather and TCM's count reduction), no object collective; called on its own, a loss
never communicates, even with a process group, so one rank may call it alone."""
from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dml_core.losses import BCT, TCM, ClipLoss, DecomposableLoss, DistributedLoss, EmbeddingBatch, InfoNCE
from tests.conftest import run_gloo

COLLECTIVES = [
    "all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced",
    "all_gather_object", "broadcast", "broadcast_object_list", "all_reduce", "all_reduce_coalesced", "reduce",
    "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base", "gather",
    "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
]
OBJECT_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"}
LOCAL, NUM_SAMPLES = 6, 24


@contextlib.contextmanager
def counting():
    """Count the calls of every torch.distributed collective (forward and backward) inside the block."""
    import torch.distributed.distributed_c10d as c10d

    counts, saved = Counter(), []
    for module in (dist, c10d):
        for name in COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapper(*args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(*args, **kwargs)

            saved.append((module, name, original))
            setattr(module, name, wrapper)
    try:
        yield counts
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def make_loss(kind: str) -> nn.Module:
    w_old = nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    return {
        "info_nce+tcm": lambda: InfoNCE() + TCM(),
        "tiled_info_nce+tcm": lambda: InfoNCE(tiled_above=0) + TCM(),
        "decomposable+tcm": lambda: DecomposableLoss(NUM_SAMPLES) + TCM(),
        "decomposable+tcm+bct": lambda: DecomposableLoss(NUM_SAMPLES) + TCM() + BCT(w_old),
        "clip+tcm": lambda: ClipLoss(learn_scale=True) + TCM(),
    }[kind]()


def local_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(LOCAL, 5, generator=g)
    pair = torch.arange(LOCAL // 2).repeat(2) + LOCAL * rank  # pair ids: the two-view layout
    return x, pair % 3, pair


def count_one_step(rank: int, world_size: int, kinds: list[str]) -> dict:
    torch.manual_seed(0)
    encoder = nn.Linear(5, 4)
    out = {}
    for kind in kinds:
        loss = DistributedLoss(make_loss(kind))
        x, labels, ids = local_batch(rank)
        with counting() as counts:
            loss(encoder(x), labels, ids).backward()
        out[kind] = dict(counts)
    return out


@pytest.mark.slow
def test_one_step_makes_one_batch_gather_and_no_object_collective():
    kinds = ["info_nce+tcm", "tiled_info_nce+tcm", "decomposable+tcm", "decomposable+tcm+bct", "clip+tcm"]
    per_rank = run_gloo(count_one_step, 2, kinds)
    gather_tcm = {"all_gather_single": 1, "all_reduce": 1, "reduce_scatter_single": 1}
    want = {"info_nce+tcm": gather_tcm, "tiled_info_nce+tcm": gather_tcm, "clip+tcm": gather_tcm,
            # the decomposable loss adds one all-gather of every rank's Zhat for its E-step
            "decomposable+tcm": {**gather_tcm, "all_gather_single": 2},
            "decomposable+tcm+bct": {**gather_tcm, "all_gather_single": 2}}
    for counts in per_rank:
        assert counts == want
        for kind, c in counts.items():
            assert not OBJECT_COLLECTIVES & set(c), kind
            assert sum(v for k, v in c.items() if "gather" in k) <= 2, kind


def rank_zero_alone(rank: int, world_size: int) -> dict:
    counts = {}
    if rank == 0:
        x, labels, ids = local_batch(0)
        encoder = nn.Linear(5, 4)
        with counting() as counts:
            for kind in ["info_nce+tcm", "decomposable+tcm+bct", "clip+tcm"]:
                make_loss(kind)(encoder(x), labels, ids).backward()
            InfoNCE()(encoder(x), labels).backward()
            DecomposableLoss(NUM_SAMPLES)(encoder(x), labels, ids).backward()
        counts = dict(counts)
    dist.barrier()  # rank 1 only waits here; a collective inside a loss on rank 0 would hang or fail
    return counts


@pytest.mark.slow
def test_a_loss_called_on_one_rank_does_not_communicate():
    assert dist.is_available()
    assert run_gloo(rank_zero_alone, 2, timeout=90) == [{}, {}]


def gather_batches(rank: int, world_size: int) -> dict:
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        x = (torch.arange(12.0).view(3, 4) + 10 * rank + 1).to(dtype).requires_grad_()
        # labels and ids whose bit patterns read as NaN or inf in every float width
        labels = torch.tensor([-1, 2**62 + rank, 0x7FF0_0000_0000_0000 + rank])
        ids = torch.tensor([0x7FC0_7FC0_7FC0_7FC0, -(2**40) - rank, rank])
        batch = EmbeddingBatch.gather(x, labels, ids)
        (batch.k * torch.arange(1.0, 1 + 3 * world_size)[:, None].to(dtype)).sum().backward()
        out[str(dtype)] = dict(k=batch.k.detach().double().numpy(), q=batch.q.detach().double().numpy(),
                               labels=batch.labels_k.numpy(), ids=batch.ids_k.numpy(), offset=batch.offset,
                               world=batch.world, grad=x.grad.double().numpy())
        no_ids = EmbeddingBatch.gather(x.detach(), labels)
        out[str(dtype)]["no_ids"] = (no_ids.ids_k is None, no_ids.labels_k.numpy())
    return out


@pytest.mark.slow
def test_gather_carries_labels_and_ids_bit_exactly_in_every_dtype():
    import numpy as np

    world = 2
    per_rank = run_gloo(gather_batches, world)
    labels = np.concatenate([[-1, 2**62 + r, 0x7FF0_0000_0000_0000 + r] for r in range(world)])
    ids = np.concatenate([[0x7FC0_7FC0_7FC0_7FC0, -(2**40) - r, r] for r in range(world)])
    for r, out in enumerate(per_rank):
        for dtype, got in out.items():
            x_all = torch.cat([torch.arange(12.0).view(3, 4) + 10 * s + 1 for s in range(world)])
            want_k = nn.functional.normalize(x_all.to(getattr(torch, dtype.split(".")[1])), dim=1).double()
            np.testing.assert_array_equal(got["labels"], labels, err_msg=dtype)
            np.testing.assert_array_equal(got["ids"], ids, err_msg=dtype)
            np.testing.assert_array_equal(got["k"], want_k.numpy(), err_msg=dtype)
            np.testing.assert_array_equal(got["q"], got["k"][3 * r: 3 * r + 3], err_msg=dtype)
            assert got["offset"] == 3 * r and got["world"] == world
            assert got["no_ids"][0] and np.array_equal(got["no_ids"][1], labels)
            # the gradient of sum_i w_i k_i summed over both ranks' losses, through normalisation, for rank r
            x = (x_all[3 * r: 3 * r + 3]).to(getattr(torch, dtype.split(".")[1])).requires_grad_()
            w = world * torch.arange(1.0 + 3 * r, 4.0 + 3 * r)[:, None].to(x.dtype)
            (nn.functional.normalize(x, dim=1) * w).sum().backward()
            np.testing.assert_allclose(got["grad"], x.grad.double().numpy(), rtol=1e-2 if "16" in dtype else 1e-6,
                                       err_msg=dtype)

"""Gradient cache (METHODS.md 1.4): same parameter gradient as the full batch, dropout included."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import dml_core.gradcache as gradcache_module
from dml_core.distributed import is_distributed
from dml_core.gradcache import GradCache
from dml_core.losses import TCM, DistributedLoss, EmbeddingLoss
from tests.conftest import run_gloo


class NaiveInfoNCE(EmbeddingLoss):
    """Supervised InfoNCE written out in the test (METHODS 1.1) over this rank's rows only."""

    def compute(self, batch):
        zn, labels = batch.q, batch.labels_q
        s = zn @ zn.T / 0.1
        eye = torch.eye(len(zn), dtype=torch.bool)
        log_den = torch.logsumexp(s.masked_fill(eye, -torch.inf), dim=1)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        rows = -((s - log_den[:, None]) * pos).sum(1) / pos.sum(1).clamp(min=1)
        return rows[pos.any(1)].mean()


def make_encoder(seed=0, dropout=0.2, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4)).to(dtype)


def make_batch(n=12, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.arange(n) % 3


def grads_of(module):
    return [p.grad.clone() for p in module.parameters()]


def reference_grads(encoder, x, labels, loss_fn, chunk_size, seed):
    """Full-batch gradient, forwarding the same chunks in the same order from the same RNG start."""
    torch.manual_seed(seed)
    encoder.zero_grad()
    z = torch.cat([encoder(c) for c in x.split(chunk_size)])
    loss = loss_fn(z, labels)
    loss.backward()
    return float(loss.detach()), grads_of(encoder), torch.get_rng_state()


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12])
@pytest.mark.parametrize("loss_fn", [NaiveInfoNCE(), NaiveInfoNCE() + TCM(m_pos=0.5, m_neg=0.0)])
def test_gradcache_equals_full_batch_gradient_with_dropout(chunk_size, loss_fn):
    x, labels = make_batch()
    enc_ref, enc = make_encoder(), make_encoder()
    want_loss, want, rng_after = reference_grads(enc_ref, x, labels, loss_fn, chunk_size, seed=3)
    torch.manual_seed(3)
    got_loss = GradCache(enc, loss_fn, chunk_size).step(x, labels)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for g, w in zip(grads_of(enc), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # afterwards the RNG is where a plain forward pass would have left it
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_without_rng_restoring_the_gradient_would_differ(monkeypatch):
    """Proves the test above can fail: re-running chunks with fresh dropout masks changes the gradient."""
    x, labels = make_batch()
    _, want, _ = reference_grads(make_encoder(), x, labels, NaiveInfoNCE(), 4, seed=3)
    monkeypatch.setattr(gradcache_module, "_rng_restored", lambda state: contextlib.nullcontext())
    enc = make_encoder()
    torch.manual_seed(3)
    GradCache(enc, NaiveInfoNCE(), 4).step(x, labels)
    assert max(float((g - w).abs().max()) for g, w in zip(grads_of(enc), want)) > 1e-3


class DictEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(6, 4), nn.Linear(3, 4), nn.Dropout(0.3)

    def forward(self, image, text):
        return self.drop(self.a(image)) + self.b(text)


def test_dict_inputs_are_split_and_passed_as_keywords():
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(10, 6, generator=g), "text": torch.randn(10, 3, generator=g)}
    labels = torch.arange(10) % 2
    torch.manual_seed(0)
    ref, enc = DictEncoder(), DictEncoder()
    enc.load_state_dict(ref.state_dict())
    torch.manual_seed(4)
    chunks = [{k: v[i:i + 3] for k, v in inputs.items()} for i in range(0, 10, 3)]
    NaiveInfoNCE()(torch.cat([ref(**c) for c in chunks]), labels).backward()
    torch.manual_seed(4)
    GradCache(enc, NaiveInfoNCE(), 3).step(inputs, labels)
    for g_got, g_want in zip(grads_of(enc), grads_of(ref)):
        torch.testing.assert_close(g_got, g_want)


def test_bf16_autocast_matches_the_same_autocast_full_batch():
    x, labels = make_batch(dtype=torch.float32)
    enc_ref, enc = make_encoder(dtype=torch.float32), make_encoder(dtype=torch.float32)
    torch.manual_seed(2)
    zs = []
    for c in x.split(4):  # one autocast region per chunk, as GradCache does (its weight-cast cache is per region)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zs.append(enc_ref(c))
    z = torch.cat(zs)
    assert z.dtype == torch.bfloat16
    NaiveInfoNCE()(z.float(), labels).backward()
    torch.manual_seed(2)
    GradCache(enc, NaiveInfoNCE(), 4, autocast_dtype=torch.bfloat16).step(x, labels)
    for g, w in zip(grads_of(enc), grads_of(enc_ref)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_ids_reach_the_loss():
    class NeedsIds(EmbeddingLoss):
        def forward(self, z, labels, ids=None):
            self.seen_ids = ids
            return (z.sum(1) * ids).sum()

    loss = NeedsIds()
    x, labels = make_batch(6)
    GradCache(make_encoder(dropout=0.0), loss, 4).step(x, labels, torch.arange(6))
    assert torch.equal(loss.seen_ids, torch.arange(6))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(6, 6, dtype=torch.float64), torch.arange(5)), "labels must be 1-D with one entry per input row"),
    ((torch.randn(6, 6, dtype=torch.float64), torch.arange(6), torch.arange(4)), "ids must be 1-D"),
    (({"image": torch.randn(6, 6), "text": torch.randn(5, 3)}, torch.arange(6)), "same batch size"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        GradCache(make_encoder(), NaiveInfoNCE(), 4).step(*args)


def test_bad_chunk_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(make_encoder(), NaiveInfoNCE(), 0)


# ------------------------------------------------- normalisation layers (METHODS 1.4) ---------

def make_cnn(norm, seed=0, dropout=0.2):
    """small_cnn backbone (float64, training mode) + dropout + linear projection."""
    from dml_core.models.registry import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn", in_channels=1, image_size=8, widths=(4, 8), norm=norm)
    enc = nn.Sequential(backbone, nn.Dropout(dropout), nn.Linear(8, 4)).double().train()
    g = torch.Generator().manual_seed(seed + 1)
    for m in enc.modules():  # running statistics off their defaults, so frozen BatchNorm is not the identity
        if hasattr(m, "running_mean") and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return enc


def image_batch(n=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 3


def norm_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def max_rel_diff(got, want):
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))


@pytest.mark.parametrize("norm", ["group", "frozen_batch"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 12])
def test_gradcache_equals_full_batch_with_per_sample_norm_and_dropout(norm, chunk_size):
    x, labels = image_batch()
    enc_ref, enc = make_cnn(norm), make_cnn(norm)
    want_loss, want, rng_after = reference_grads(enc_ref, x, labels, NaiveInfoNCE(), chunk_size, seed=7)
    torch.manual_seed(7)
    got_loss = GradCache(enc, NaiveInfoNCE(), chunk_size).step(x, labels)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert max_rel_diff(grads_of(enc), want) < 1e-10
    assert torch.equal(torch.get_rng_state(), rng_after)


@pytest.mark.parametrize("norm", ["group", "frozen_batch"])
def test_without_dropout_gradcache_equals_one_full_batch_forward(norm):
    x, labels = image_batch()
    enc_ref = make_cnn(norm, dropout=0.0)
    NaiveInfoNCE()(enc_ref(x), labels).backward()  # the whole batch in one forward
    for chunk_size in (1, 4, 5):
        enc = make_cnn(norm, dropout=0.0)
        GradCache(enc, NaiveInfoNCE(), chunk_size).step(x, labels)
        assert max_rel_diff(grads_of(enc), grads_of(enc_ref)) < 1e-10


def test_train_mode_batch_norm_is_refused():
    x, labels = image_batch()
    enc = make_cnn("batch")
    with pytest.raises(ValueError, match=r"BatchNorm in training mode \(0\.features\.1, 0\.features\.4, "
                                         r"0\.features\.8 and 1 more\).*norm='group' or norm='frozen_batch'"):
        GradCache(enc, NaiveInfoNCE(), 4).step(x, labels)
    assert all(p.grad is None for p in enc.parameters())
    GradCache(enc.eval(), NaiveInfoNCE(), 4).step(x, labels)  # eval mode: running statistics, per-sample
    no_stats = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    with pytest.raises(ValueError, match="BatchNorm in training mode"):  # batch statistics in eval mode too
        GradCache(no_stats.eval(), NaiveInfoNCE(), 4).step(x, labels)


def test_train_mode_batch_norm_is_inexact_when_allowed():
    """Why it is refused: BatchNorm statistics per chunk change the gradient (a test that can fail)."""
    x, labels = image_batch()
    enc_ref, enc = make_cnn("batch", dropout=0.0), make_cnn("batch", dropout=0.0)
    NaiveInfoNCE()(enc_ref(x), labels).backward()
    GradCache(enc, NaiveInfoNCE(), 4, allow_batch_stats=True).step(x, labels)
    assert max_rel_diff(grads_of(enc), grads_of(enc_ref)) > 1e-2


class BufferSnapshotLoss(NaiveInfoNCE):
    """Records the encoder's norm buffers when called: in phase 2, after phase 1 and before phase 3."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = [encoder], None  # a list: not a submodule

    def forward(self, z, labels, ids=None):
        self.seen = norm_buffers(self.encoder[0])
        return super().forward(z, labels, ids)


@pytest.mark.parametrize("norm", ["batch", "frozen_batch"])
def test_phase_one_leaves_running_statistics_unchanged(norm):
    x, labels = image_batch()
    enc = make_cnn(norm)
    enc.append(nn.Unflatten(1, (1, 4))).append(nn.InstanceNorm1d(1, track_running_stats=True)).append(nn.Flatten())
    before = norm_buffers(enc)
    assert len(before) == 4 * 3 + 3  # four (frozen) BatchNorm layers and the InstanceNorm
    loss = BufferSnapshotLoss(enc)
    torch.manual_seed(1)
    GradCache(enc, loss, 5, allow_batch_stats=norm == "batch").step(x, labels)
    assert loss.seen.keys() == before.keys()
    for k in before:  # bit for bit, num_batches_tracked included
        assert torch.equal(loss.seen[k], before[k]), k
    # after the step: each chunk entered the running statistics once (phase 3), as in a plain chunked forward
    ref = make_cnn(norm)
    ref.append(nn.Unflatten(1, (1, 4))).append(nn.InstanceNorm1d(1, track_running_stats=True)).append(nn.Flatten())
    torch.manual_seed(1)
    with torch.no_grad():
        for c in x.split(5):
            ref(c)
    after, want = norm_buffers(enc), norm_buffers(ref)
    for k in before:
        assert torch.equal(after[k], want[k]), k
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    instance_norm = ["4.running_mean", "4.running_var"]  # InstanceNorm does not count batches
    if norm == "batch":
        assert changed == [k for k in before if k.startswith("0.")] + instance_norm  # moved in phase 3
        assert int(after["0.features.1.num_batches_tracked"]) == 3  # 3 chunks, not 6
    else:
        assert changed == instance_norm  # frozen BatchNorm never updates


def test_running_statistics_are_restored_when_phase_one_fails():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    enc = make_cnn("batch").append(Boom())
    before = norm_buffers(enc)
    with pytest.raises(RuntimeError, match="boom"):
        GradCache(enc, NaiveInfoNCE(), 4, allow_batch_stats=True).step(*image_batch())
    assert all(torch.equal(v, before[k]) for k, v in norm_buffers(enc).items())


# ---------------------------------------------------------------- DDP ------------------------

WORLD, LOCAL, CHUNK = 2, 6, 4


def _ddp_gradcache(rank, world_size, init_state, x, labels):
    enc = make_encoder()
    enc.load_state_dict(init_state)
    model = nn.parallel.DistributedDataParallel(enc) if is_distributed() else enc
    part = slice(rank * LOCAL, (rank + 1) * LOCAL)
    torch.manual_seed(100 + rank)  # each rank has its own dropout stream
    loss_fn = DistributedLoss(NaiveInfoNCE() + TCM(m_pos=0.5, m_neg=0.0))
    loss = GradCache(model, loss_fn, CHUNK).step(x[part], labels[part])
    return loss, [p.grad.numpy().copy() for p in enc.parameters()]


@pytest.mark.slow
def test_ddp_gradcache_equals_single_process_global_batch():
    x, labels = make_batch(WORLD * LOCAL)
    enc = make_encoder()
    init = {k: v.clone() for k, v in enc.state_dict().items()}
    # reference: each rank's chunks from that rank's RNG start, one global loss (TCM on the global batch)
    zs = []
    for r in range(WORLD):
        torch.manual_seed(100 + r)
        zs += [enc(c) for c in x[r * LOCAL:(r + 1) * LOCAL].split(CHUNK)]
    z = torch.cat(zs)
    tcm = TCM(m_pos=0.5, m_neg=0.0)
    # NaiveInfoNCE is single-process, so under DDP it sees the local rows only: mirror that here
    loss = sum(NaiveInfoNCE()(z[r * LOCAL:(r + 1) * LOCAL], labels[r * LOCAL:(r + 1) * LOCAL])
               for r in range(WORLD)) / WORLD + tcm(z, labels)
    loss.backward()
    results = run_gloo(_ddp_gradcache, WORLD, init, x, labels)
    for _, got in results:
        for g, p in zip(got, enc.parameters()):
            np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert sum(v for v, _ in results) / WORLD == pytest.approx(float(loss.detach()), rel=1e-9)

"""Normalisation choices of the built-in backbones (models/norm.py): frozen BatchNorm is eval-mode BatchNorm
in training mode too, with trainable affine parameters and never-updated running statistics."""
import pytest
import torch
from torch import nn

from dml_core.models.norm import NORMS, FrozenBatchNorm2d, norm2d


def _bn_with_stats(channels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("training", [True, False])
def test_frozen_batch_norm_is_eval_mode_batch_norm(training):
    bn = _bn_with_stats()
    frozen = FrozenBatchNorm2d(5)
    assert frozen.state_dict().keys() == bn.state_dict().keys()  # a "batch" checkpoint loads into it
    frozen.load_state_dict(bn.state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(frozen.train(training)(x), bn.eval()(x), rtol=0, atol=0)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_batch_norm_trains_its_affine_parameters_and_treats_samples_independently():
    frozen = FrozenBatchNorm2d(3).train()
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["weight", "bias"]
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    frozen(x).pow(2).sum().backward()
    assert frozen.weight.grad.abs().sum() > 0 and frozen.bias.grad.abs().sum() > 0 and x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([frozen(c) for c in x.split(2)]), frozen(x), rtol=0, atol=0)
    assert "num_batches_tracked" in dict(frozen.named_buffers()) and int(frozen.num_batches_tracked) == 0


def test_frozen_batch_norm_is_not_a_batch_norm_for_sync_conversion():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), FrozenBatchNorm2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], FrozenBatchNorm2d)
    assert "FrozenBatchNorm2d(4, eps=1e-05)" in repr(converted)
    with pytest.raises(ValueError, match="4-D"):
        FrozenBatchNorm2d(4)(torch.randn(2, 4))


def test_norm2d_by_name():
    assert NORMS == ("batch", "frozen_batch", "group")
    assert isinstance(norm2d("batch", 8, 4), nn.BatchNorm2d)
    assert isinstance(norm2d("frozen_batch", 8, 4), FrozenBatchNorm2d)
    gn = norm2d("group", 8, 4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 8
    with pytest.raises(ValueError, match="norm must be one of 'batch', 'frozen_batch', 'group', got 'layer'"):
        norm2d("layer", 8, 4)

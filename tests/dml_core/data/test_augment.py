import pytest
import torch

from dml_core.data.augment import AugmentConfig, apply_affine, augment, photometric, sample_affine, two_views

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, max_rotate_deg=0.0, brightness=0.0,
                contrast=0.0, noise_std=0.0)


def _images(n=6, c=3, h=12, w=12, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_two_views_differ_keep_shape_and_range():
    x = _images()
    v1, v2 = two_views(x, AugmentConfig(out_size=10), torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (6, 3, 10, 10)
    for v in (v1, v2):
        assert v.dtype == x.dtype and v.min() >= 0 and v.max() <= 1 and torch.isfinite(v).all()
    assert ((v1 - v2).abs().flatten(1).mean(1) > 1e-3).all()  # every image's two views differ


def test_deterministic_for_a_fixed_generator():
    x = _images()
    cfg = AugmentConfig()
    a = two_views(x, cfg, torch.Generator().manual_seed(7))
    b = two_views(x, cfg, torch.Generator().manual_seed(7))
    c = two_views(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_identity_config_returns_the_input():
    x = _images()
    y = augment(x, AugmentConfig(**IDENTITY), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_flip_matches_torch_flip():
    x = _images()
    y = augment(x, AugmentConfig(**{**IDENTITY, "hflip_p": 1.0}), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, torch.flip(x, dims=[-1]), rtol=0, atol=1e-6)


def test_centre_crop_map_matches_slicing():
    x = _images(h=8, w=8)
    theta = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]).expand(len(x), 2, 3)  # half size, centred
    y = apply_affine(x, theta, out_size=4)
    torch.testing.assert_close(y, x[:, :, 2:6, 2:6], rtol=0, atol=1e-6)


def test_crop_area_within_scale_range():
    cfg = AugmentConfig(scale=(0.3, 0.6), ratio=(0.5, 2.0), max_rotate_deg=0.0)
    theta = sample_affine(2000, cfg, torch.Generator().manual_seed(3))
    area = (theta[:, 0, 0].abs() * theta[:, 1, 1].abs())  # half-extents w * h = area fraction
    clamped = (theta[:, 0, 0].abs() >= 1 - 1e-6) | (theta[:, 1, 1].abs() >= 1 - 1e-6)
    assert (area[~clamped] >= 0.3 - 1e-5).all() and (area <= 0.6 + 1e-5).all()
    # the crop stays inside the image: |centre| + half-extent <= 1
    assert (theta[:, 0, 2].abs() + theta[:, 0, 0].abs() <= 1 + 1e-5).all()
    assert (theta[:, 1, 2].abs() + theta[:, 1, 1].abs() <= 1 + 1e-5).all()


def test_photometric_matches_formula():
    x = _images(n=4)
    cfg = AugmentConfig(brightness=0.3, contrast=0.4, noise_std=0.0)
    y = photometric(x, cfg, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b = 0.7 + 0.6 * torch.rand(4, generator=g)
    c = 0.6 + 0.8 * torch.rand(4, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    ref = (((x - mean) * c.view(4, 1, 1, 1) + mean) * b.view(4, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(y, ref)


def test_bad_input_and_config():
    with pytest.raises(ValueError, match="float N x C x H x W"):
        augment(torch.zeros(3, 8, 8), AugmentConfig(), torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))

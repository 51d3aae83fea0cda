"""Batched image augmentation on the training device, in plain torch (two views for self-supervised losses).

Geometry (random resized crop, horizontal flip, small rotation) is one affine map per image applied with
a single `grid_sample`; photometry is brightness, contrast and Gaussian noise. All randomness comes from
the `torch.Generator` given, so a fixed generator state gives the same views. Pass a generator on the
images' device to avoid moving random numbers between devices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    out_size: int | None = None  # output height = width; None keeps the input size
    scale: tuple[float, float] = (0.35, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
    hflip_p: float = 0.5  # set 0 for digits, glyphs and other chiral data
    max_rotate_deg: float = 10.0
    brightness: float = 0.2  # multiply by U(1 - b, 1 + b)
    contrast: float = 0.2  # scale deviations from the image mean by U(1 - c, 1 + c)
    noise_std: float = 0.02

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"hflip_p must be in [0, 1], got {self.hflip_p}")
        for name in ("max_rotate_deg", "brightness", "contrast", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)


def sample_affine(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """n x 2 x 3 affine maps from output to input coordinates (normalised to [-1, 1], as `affine_grid`)."""
    area = _uniform(n, cfg.scale[0], cfg.scale[1], generator)
    log_r = _uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), generator)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop half-extent in normalised units
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * _uniform(n, -1.0, 1.0, generator)
    cy = (1 - h) * _uniform(n, -1.0, 1.0, generator)
    flip = torch.rand(n, generator=generator, device=generator.device) < cfg.hflip_p
    angle = _uniform(n, -1.0, 1.0, generator) * math.radians(cfg.max_rotate_deg)
    cos, sin = angle.cos(), angle.sin()
    sx = torch.where(flip, -w, w)
    theta = torch.stack([torch.stack([sx * cos, -h * sin, cx], dim=1),
                         torch.stack([sx * sin, h * cos, cy], dim=1)], dim=1)
    return theta


def apply_affine(images: torch.Tensor, theta: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    n, c, h, w = images.shape
    size = (n, c, out_size or h, out_size or w)
    grid = F.affine_grid(theta.to(images.device, images.dtype), size, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def photometric(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and Gaussian noise; the result is clamped to [0, 1]."""
    n = images.shape[0]
    dev = images.device
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, generator).to(dev).view(n, 1, 1, 1)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, generator).to(dev).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * c + mean
    out = out * b
    if cfg.noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, device=generator.device)
        out = out + cfg.noise_std * noise.to(dev, images.dtype)
    return out.clamp_(0.0, 1.0)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image in an N x C x H x W float batch with values in [0, 1]."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"augment needs a float N x C x H x W batch, got {images.dtype} {tuple(images.shape)}")
    theta = sample_affine(images.shape[0], cfg, generator)
    return photometric(apply_affine(images, theta, cfg.out_size), cfg, generator)


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of each image (for self-supervised / SimCLR-style losses)."""
    return augment(images, cfg, generator), augment(images, cfg, generator)

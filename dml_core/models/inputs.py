"""Input checks shared by the backbones: a clear error instead of a cryptic conv/shape failure."""
from __future__ import annotations

import torch


def check_images(x: torch.Tensor, in_channels: int, min_size: int = 1,
                 size: tuple[int, int] | None = None, name: str = "input") -> None:
    """Raise if `x` is not a floating (N, C, H, W) batch with C == in_channels and H, W >= min_size
    (or exactly `size` when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (convert uint8 images to float), got {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the model was built with "
                         f"in_channels={in_channels} (shape {tuple(x.shape)})")
    h, w = int(x.shape[2]), int(x.shape[3])
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"{name} must be {size[0]}x{size[1]} px (the model's image_size), got {h}x{w}")
    if min(h, w) < min_size:
        raise ValueError(f"{name} is {h}x{w} px, smaller than the model's minimum of {min_size} px")

import pytest
import torch

from dml_core.models.inputs import check_images


def test_accepts_a_valid_batch():
    check_images(torch.zeros(2, 3, 8, 8), 3, min_size=8, size=(8, 8))


@pytest.mark.parametrize("x,kwargs,error,match", [
    ([[0.0]], {}, TypeError, "must be a torch.Tensor, got list"),
    (torch.zeros(3, 8, 8), {}, ValueError, r"4-D \(N, C, H, W\).*\(3, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {}, TypeError, "floating point.*uint8"),
    (torch.zeros(2, 1, 8, 8), {}, ValueError, "has 1 channels but the model was built with in_channels=3"),
    (torch.zeros(2, 3, 8, 6), {"size": (8, 8)}, ValueError, "must be 8x8 px .* got 8x6"),
    (torch.zeros(2, 3, 8, 3), {"min_size": 4}, ValueError, "8x3 px, smaller than the model's minimum of 4 px"),
])
def test_bad_batches_name_the_problem(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_images(x, 3, name="batch", **kwargs)

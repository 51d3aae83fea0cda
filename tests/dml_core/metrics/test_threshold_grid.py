import numpy as np
import pytest
import torch

from dml_core.metrics.threshold_grid import make_grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucket_equals_binary_search_at_and_around_every_threshold(dtype):
    g = make_grid(0.61234, 1.0633, 101, 1.0, dtype, "cpu")
    np.testing.assert_array_equal(g.values[g.calib], np.linspace(0.61234, 1.0633, 101))
    assert g.values[0] >= 0 and g.values[-1] <= 2 and np.all(np.diff(g.values) > 0)
    t = g.tensor
    d = torch.cat([torch.rand(100_000, dtype=dtype) * 2, t, torch.nextafter(t, torch.tensor(9.0, dtype=dtype)),
                   torch.nextafter(t, torch.tensor(-9.0, dtype=dtype)), torch.tensor([0.0, 2.0], dtype=dtype)])
    np.testing.assert_array_equal(g.bucket(d).numpy(), torch.bucketize(d, t).numpy())


def test_float32_thresholds_never_accept_above_the_float64_value():
    g = make_grid(0.3, 0.7, 11, 0.0, torch.float32, "cpu")
    assert np.all(g.tensor.double().numpy() <= g.values)


def test_degenerate_ranges_use_binary_search():
    g = make_grid(0.5, 0.5, 7, 1.0, torch.float64, "cpu")
    assert g.step is None and g.size == 7
    d = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64)
    assert g.bucket(d).tolist() == [0, 0, 7]

import numpy as np
import pytest
import torch

from dml_core.metrics.opis_calibration import exact_negative_quantiles, sample_negative_distances
from tests.dml_core.metrics.helpers import clustered


def _sorted(z, y):
    z = torch.nn.functional.normalize(torch.from_numpy(z), dim=1)
    y = torch.from_numpy(y)
    perm = torch.argsort(y, stable=True)
    _, cls, sizes = torch.unique(y[perm], return_inverse=True, return_counts=True)
    return z[perm], cls, sizes


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_histogram_refine_equals_numpy_quantile(dtype):
    z, y = clustered(7, [30, 1, 50, 12, 40, 2, 25], 6, spread=1.0, seed=3, dtype=dtype)
    zs, cls, sizes = _sorted(z, y)
    qs = [0.0, 1e-3, 0.1, 0.37, 0.999, 1.0]
    # reference: every unordered negative pair distance computed the way the library does, then NumPy
    full = torch.sqrt(torch.clamp(2.0 - 2.0 * (zs @ zs.T), min=0.0))
    iu = torch.triu_indices(len(zs), len(zs), 1)
    neg = (cls[iu[0]] != cls[iu[1]])
    ref = np.quantile(full[iu[0], iu[1]][neg].double().numpy(), qs)
    ends = torch.cumsum(sizes, 0)
    a, info_a = exact_negative_quantiles(zs, cls, ends, qs, max_chunk_elements=500)
    b, info_b = exact_negative_quantiles(zs, cls, ends, qs, max_chunk_elements=500, max_calibration_buffer=10,
                                         num_bins=64)
    assert info_a["method"] == "all_values" and info_b["method"] == "histogram_refine"
    np.testing.assert_allclose(a, ref, rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(b, a, rtol=1e-13)
    assert info_b["num_negative_pairs"] == int(neg.sum())


def test_sampled_pairs_are_uniform_over_negative_pairs():
    sizes = torch.tensor([1, 3, 6])
    cls = torch.repeat_interleave(torch.arange(3), sizes)
    zs = torch.nn.functional.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    d, (a, p) = sample_negative_distances(zs, cls, 400_000, torch.Generator().manual_seed(0), block=32,
                                          return_pairs=True)
    assert d.numel() == 400_000 and bool((cls[a] != cls[p]).all())
    full = torch.sqrt(torch.clamp(2.0 - 2.0 * (zs @ zs.T), min=0.0))
    torch.testing.assert_close(d, full[a, p])
    counts = torch.zeros(10, 10)
    counts.index_put_((a, p), torch.ones(len(a)), accumulate=True)
    neg = (cls[:, None] != cls[None, :]).float()
    expected = neg / neg.sum() * len(a)  # 54 ordered negative pairs, equally likely
    # pairs of one block share rows, so counts vary more than Poisson: about 3% relative s.d. here
    assert float(((counts - expected).abs() / expected.clamp(min=1)).max()) < 0.15
    assert int(counts[neg == 0].sum()) == 0

import numpy as np
import pytest
import torch

from dml_core.metrics.knn import KnnSearcher, knn, knn_leave_one_out
from tests.dml_core.metrics.helpers import clustered


def _normed(n, d, seed):
    z = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d))).float()
    return torch.nn.functional.normalize(z, dim=1)


def _brute(q, g, k, self_index=None):
    s = (q.double() @ g.double().T).numpy()
    if self_index is not None:
        s[np.arange(len(q)), self_index.numpy()] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_leave_one_out_matches_brute_force(backend):
    z = _normed(300, 16, 0)
    res = knn_leave_one_out(z, 7, backend=backend, max_chunk_elements=1000)  # forces many chunks
    assert res.indices.shape == (300, 7)
    np.testing.assert_array_equal(res.indices.numpy(), _brute(z, z, 7, torch.arange(300)))
    assert not (res.indices == torch.arange(300)[:, None]).any()
    assert (res.similarities[:, :-1] >= res.similarities[:, 1:]).all()


def test_faiss_and_torch_agree_query_gallery():
    q, g = _normed(120, 24, 1), _normed(500, 24, 2)
    a = knn(q, g, 10, backend="faiss")
    b = knn(q, g, 10, backend="torch", max_chunk_elements=2048)
    np.testing.assert_array_equal(a.indices.numpy(), b.indices.numpy())
    np.testing.assert_allclose(a.similarities.numpy(), b.similarities.numpy(), atol=1e-5)
    np.testing.assert_array_equal(a.indices.numpy(), _brute(q, g, 10))


def test_self_exclusion_across_models_and_duplicates():
    # Same items, two "models": self excluded by index, not by similarity.
    z1 = _normed(200, 8, 3)
    z2 = torch.nn.functional.normalize(z1 + 0.05 * _normed(200, 8, 4), dim=1)
    for backend in ("faiss", "torch"):
        r = knn(z2, z1, 5, self_index=torch.arange(200), backend=backend)
        np.testing.assert_array_equal(r.indices.numpy(), _brute(z2, z1, 5, torch.arange(200)))
    # Exact duplicates: the item itself may not come first; it must still never be returned.
    dup = torch.cat([z1[:10]] * 4)
    for backend in ("faiss", "torch"):
        r = knn_leave_one_out(dup, 3, backend=backend)
        assert not (r.indices == torch.arange(40)[:, None]).any()
        np.testing.assert_allclose(r.similarities.numpy(), 1.0, atol=1e-5)


def test_clustered_float64_torch_matches_faiss():
    z, _ = clustered(20, 15, 32, seed=5)
    z = torch.nn.functional.normalize(torch.from_numpy(z), dim=1)
    a = knn_leave_one_out(z, 4, backend="torch")
    b = knn_leave_one_out(z, 4, backend="faiss")
    np.testing.assert_array_equal(a.indices.numpy(), b.indices.numpy())


def test_bad_k_and_backend():
    z = _normed(10, 4, 0)
    with pytest.raises(ValueError, match="k=10 must be between 1 and the number of gallery candidates \\(9\\)"):
        knn_leave_one_out(z, 10)
    with pytest.raises(ValueError, match="knn backend must be one of"):
        KnnSearcher(z, backend="annoy")
    with pytest.raises(ValueError, match="query dimension 3 differs from gallery dimension 4"):
        knn(_normed(2, 3, 0), z, 1)

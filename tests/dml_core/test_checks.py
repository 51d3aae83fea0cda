"""Shared input conversion and parameter checks of the functional forms (METHODS.md 7)."""
import numpy as np
import pytest
import torch

from dml_core.checks import as_tensor, check_int, check_positive, embedding_inputs


def test_embedding_inputs_take_tensors_arrays_and_lists():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    zt, yt = embedding_inputs(z, torch.tensor([0, 0, 1, 1], dtype=torch.int32))
    assert zt is z and yt.dtype == torch.int64  # the graph is kept, labels become int64
    zn, yn = embedding_inputs(np.ones((4, 3)), np.array([0, 0, 1, 1], dtype=np.int16))
    assert zn.dtype == torch.float64 and yn.dtype == torch.int64 and yn.tolist() == [0, 0, 1, 1]
    zl, yl = embedding_inputs([[1.0, 0.0], [0.0, 1.0]], [3, 3])
    assert zl.shape == (2, 2) and yl.tolist() == [3, 3]
    _, yf = embedding_inputs(np.ones((2, 2)), np.array([0.5, 1.0]))
    assert yf.is_floating_point()  # left for check_labels to reject with its message
    with pytest.raises(TypeError, match="labels of z must be a torch.Tensor, NumPy array or list"):
        embedding_inputs(z, {0: 1})
    with pytest.raises(TypeError, match="z: cannot convert the list"):
        embedding_inputs([[1.0, 0.0], [1.0]], [0, 0])


def test_as_tensor_detaches_only_when_asked():
    z = torch.randn(2, 2, requires_grad=True)
    assert as_tensor(z, "z") is z and not as_tensor(z, "z", detach=True).requires_grad


@pytest.mark.parametrize("value", [0, 0.0, -0.1, float("nan"), float("inf"), float("-inf")])
def test_check_positive_rejects(value):
    with pytest.raises(ValueError, match="loss: tau must be > 0"):
        check_positive(value, "tau", "loss")


def test_check_positive_and_int_accept_and_type_errors():
    assert check_positive(0.1, "tau", "f") == 0.1 and check_positive(np.float32(2), "tau", "f") == 2.0
    assert check_positive(torch.tensor(0.5), "tau", "f") == 0.5
    with pytest.raises(TypeError, match="f: tau must be a real number"):
        check_positive("0.1", "tau", "f")
    with pytest.raises(TypeError):
        check_positive(True, "tau", "f")
    assert check_int(3, "n", "f", 1) == 3 and check_int(np.int64(0), "n", "f", 0) == 0
    with pytest.raises(ValueError, match="f: n must be >= 1, got 0"):
        check_int(0, "n", "f", 1)
    with pytest.raises(TypeError, match="n must be an integer"):
        check_int(1.5, "n", "f", 1)

import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Conv nets on a shared 2-core machine run several times faster with one thread than with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import pytest


@pytest.fixture(autouse=True)
def one_intra_op_thread(one_torch_thread):
    """Conv nets on a shared 2-core machine run several times faster with one thread than with two."""

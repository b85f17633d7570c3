"""Model tests run single-threaded: with pytest-xdist's 2 workers on 2 shared cores, intra-op
threads only oversubscribe the CPU (a 1 s training loop took a minute with 2 threads per worker)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

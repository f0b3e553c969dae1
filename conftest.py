"""Every test runs torch on one thread (tests/ and examples/).

Test problems are small, so each torch op lasts microseconds; with several intra-op
threads per process (and ``pytest -n 2`` on two cores) the threads' hand-offs cost
40x the arithmetic. One thread per test keeps the suite fast and its timing stable.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Unit-test fixtures (no Ray)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # NOTE: on a shared 2-core machine two intra-op threads per tiny matmul are ~10x slower than one.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare floats bit for bit; keep intra-op parallelism fixed.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

import pytest
import torch

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session", autouse=True)
def _no_user_data_dir():
    """The suite runs on the bundled and generated data, whatever the user's FOGZO_DATA_DIR.

    Session-scoped, so it holds before any module-scoped fixture (e.g. the MNIST quick run)
    and in every process the tests start; tests of the variable set it themselves.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FOGZO_DATA_DIR", raising=False)
        yield


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare floats bit for bit; keep intra-op parallelism fixed.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

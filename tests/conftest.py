from pathlib import Path

import numpy as np
import pytest
import torch

from fogzo.data import write_idx

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


def _write_fake_fashion_mnist(folder: Path, train: int = 64, test: int = 32) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count).astype(np.uint8))


@pytest.fixture(scope="session")
def write_fake_fashion_mnist():
    """``write(folder)``: the four IDX files of a random 28x28 Fashion-MNIST (64 train, 32 test images)."""
    return _write_fake_fashion_mnist

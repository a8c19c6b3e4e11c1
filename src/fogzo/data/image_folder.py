"""Image folders (``<root>/<class>/*``, e.g. ImageNet-100): listing and decoding with Pillow.

:func:`list_image_folder` finds the classes (sorted subfolder names) and the images under
them; :class:`ImageFolderDataset` decodes one image per key ``(index, augment_seed)``:
centre crop for evaluation, or random-resized-crop + flip whose randomness comes from the
seed alone, so a training stream that saves its seeds is resumable. Pillow is imported when
an image is decoded.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFolderDataset", "list_image_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sorted subfolders of ``root``) and the ``(path, label)`` of every image.

    Images are the files with a suffix in :data:`IMAGE_EXTENSIONS`, found recursively, sorted by
    path within each class; ``label`` is the class's index in the sorted names.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no class folder or no image.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected <data_dir>/train and <data_dir>/val)")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} holds no class subfolders")
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(path), index))
    if not samples:
        raise FileNotFoundError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decodes ``(path, label)`` samples with Pillow; item keys are ``(index, augment_seed)``.

    ``augment_seed`` None: resize the short side to ``size/0.875`` and centre-crop ``size``.
    Otherwise random-resized-crop (scale 0.08-1, ratio 3/4-4/3) + flip with ``random.Random(seed)``.
    Returns a uint8 tensor ``[3, size, size]`` and the label.
    """

    def __init__(self, samples: list[tuple[str, int]], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = key
        path, label = self.samples[index]
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        size = self.size
        if seed is None:
            short = round(size / 0.875)
            width, height = image.size
            scale = short / min(width, height)
            image = image.resize(
                (max(short, round(width * scale)), max(short, round(height * scale))), Image.Resampling.BILINEAR
            )
            width, height = image.size
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            rng = random.Random(seed)
            width, height = image.size
            area = width * height
            box = (0, 0, width, height)
            for _ in range(10):
                target = area * rng.uniform(0.08, 1.0)
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
                if 0 < w <= width and 0 < h <= height:
                    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                    box = (left, top, left + w, top + h)
                    break
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1), label

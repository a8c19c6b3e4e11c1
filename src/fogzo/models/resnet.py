"""Residual networks (He et al., 2016).

Two families share one :class:`ResNet` class:

* CIFAR-style (``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``;
  depth ``6n + 2``): a 3x3 stem convolution and three stages of ``n`` basic
  blocks with ``width, 2*width, 4*width`` channels (16/32/64 by default) at
  resolutions 32, 16, 8, global average pooling and a linear classifier.
  When a block changes the resolution or channel count, its shortcut is a
  **1x1 convolution + BatchNorm projection** (option B), not the parameter-free
  zero-padding shortcut (option A) of the original paper; this adds 2,752
  parameters to ResNet-20 (272,474 instead of 269,722 with 10 classes).
* ImageNet-style (``resnet18``, ``resnet34`` with :class:`BasicBlock`,
  ``resnet50`` with :class:`Bottleneck`): a 7x7/2 stem convolution, 3x3/2 max
  pooling and four stages of 64/128/256/512 base channels. The bottleneck
  places its stride on the 3x3 convolution ("ResNet v1.5").

Every convolution is followed by BatchNorm, then ReLU (after the residual
addition for the last one of a block):

    basic block:      y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))
    bottleneck block: y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))
    shortcut(x) = x, or bn(conv1x1(x)) when the shape changes.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` .. ``layer4``,
``downsample.0/1``, ``fc``), so ImageNet state dicts are interchangeable; the
first convolution is ``conv1`` and the classifier ``fc``
(:attr:`ResNet.boundary_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet18",
    "resnet34",
    "resnet50",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut when the block changes shape, otherwise ``None`` (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    Shapes: ``[B, in_channels, H, W] -> [B, channels, H / stride, W / stride]``.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by :attr:`expansion` = 4, plus residual.

    Shapes: ``[B, in_channels, H, W] -> [B, 4 * channels, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """Generic ResNet: stem, ``len(stage_depths)`` stages, global average pool, ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        stage_depths: number of blocks per stage, e.g. ``(3, 3, 3)`` or ``(2, 2, 2, 2)``.
        num_classes: classifier outputs.
        in_channels: image channels (3 for RGB, 1 for MNIST).
        width: channels of the stem and first stage; stage ``i`` has
            ``width * 2**i`` base channels (times ``block.expansion`` at its output).
        cifar_stem: ``True`` for a 3x3/1 stem without max pooling (32x32 inputs),
            ``False`` for the ImageNet 7x7/2 stem followed by 3x3/2 max pooling.
        zero_init_residual: initialise the last BN of every block with zero
            scale, so that each block starts as the identity.

    Shapes: ``[B, in_channels, H, W] -> [B, num_classes]`` logits.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_depths: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
        cifar_stem: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if cifar_stem:
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

        channels_in = width
        self.num_stages = len(stage_depths)
        for stage_index, depth in enumerate(stage_depths):
            channels = width * 2**stage_index
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(channels_in, channels, stride if block_index == 0 else 1))
                channels_in = channels * block.expansion
            self.add_module(f"layer{stage_index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)
                elif isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    @property
    def boundary_layers(self) -> tuple[str, str]:
        """Names of the first convolution and the classifier."""
        return "conv1", "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage_index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage_index}")(x)
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """CIFAR ResNet of depth ``6n + 2`` (3 stages of ``n`` basic blocks, widths w/2w/4w)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        (blocks_per_stage,) * 3,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        cifar_stem=True,
    )


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-20 for 32x32 images: 272,474 parameters (10 classes, width 16)."""
    return cifar_resnet(20, num_classes, in_channels, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-32 for 32x32 images."""
    return cifar_resnet(32, num_classes, in_channels, width)


def resnet44(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-44 for 32x32 images."""
    return cifar_resnet(44, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-56 for 32x32 images."""
    return cifar_resnet(56, num_classes, in_channels, width)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-18: 11,689,512 parameters with 1000 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def resnet34(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-34: 21,797,672 parameters with 1000 classes."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-50 (v1.5): 25,557,032 parameters with 1000 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)

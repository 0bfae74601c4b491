"""ResNet18/34/50 with four stages, in the reference's CIFAR and ImageNet variants.

- ``variant="imagenet"`` (torchvision layout, what the published ImageNet teachers use): 7x7/2 stem
  conv, BN, ReLU, 3x3/2 max pool; shortcut projections named ``downsample``; classifier ``fc``.
- ``variant="cifar"`` (the reference's ``resnetv2``): 3x3/1 stem conv, BN, ReLU, no pooling;
  shortcut projections named ``shortcut``; classifier ``linear``.

Both: stages of 64, 128, 256, 512 planes with strides 1, 2, 2, 2; a projection (1x1 conv + BN) on
the first block of a stage when the stride or the width changes; the bottleneck block puts the
stride on its 3x3 conv (ResNet v1.5, as torchvision); global average pooling; a linear classifier.
Initialization: convs He-normal (fan_out), BN scale 1 / bias 0, classifier PyTorch's default
uniform.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool, max_pool

Array = jax.Array

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convs: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    planes: int
    stride: int = 1
    projection: bool = False
    projection_name: str = "shortcut"
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = Conv2d(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = Conv2d(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, train)
        return nn.relu(out + _shortcut(self, x, self.planes, train))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (4x planes) convs, each with BN; ReLU after the sum."""

    planes: int
    stride: int = 1
    projection: bool = False
    projection_name: str = "shortcut"
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = Conv2d(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = Conv2d(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = Conv2d(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
        out = BatchNorm(dtype=self.dtype, name="bn3")(out, train)
        return nn.relu(out + _shortcut(self, x, self.planes * 4, train))


def _shortcut(block: BasicBlock | Bottleneck, x: Array, features: int, train: bool) -> Array:
    """Identity, or ``bn(conv1x1(x))`` with the block's stride (``<name>_0``, ``<name>_1``)."""
    if not block.projection:
        return x
    name = block.projection_name
    y = Conv2d(features, 1, block.stride, dtype=block.dtype, name=f"{name}_0")(x)
    return BatchNorm(dtype=block.dtype, name=f"{name}_1")(y, train)


class ResNet(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32); see the module docstring."""

    stage_sizes: Sequence[int]
    bottleneck: bool = False
    variant: str = "cifar"
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.variant not in ("cifar", "imagenet"):
            raise ValueError(
                f"ResNet variant must be 'cifar' or 'imagenet' (got {self.variant!r})."
            )
        imagenet = self.variant == "imagenet"
        block_cls = Bottleneck if self.bottleneck else BasicBlock
        x = x.astype(self.dtype)
        if imagenet:
            x = Conv2d(64, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        else:
            x = Conv2d(64, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        if imagenet:
            x = max_pool(x, 3, 2, 1)
        in_planes = 64
        for stage, (planes, blocks) in enumerate(
            zip((64, 128, 256, 512), self.stage_sizes, strict=True), 1
        ):
            for i in range(blocks):
                stride = 1 if stage == 1 or i > 0 else 2
                out_planes = planes * block_cls.expansion
                x = block_cls(
                    planes,
                    stride,
                    projection=(stride != 1 or in_planes != out_planes),
                    projection_name="downsample" if imagenet else "shortcut",
                    dtype=self.dtype,
                    name=f"layer{stage}_{i}",
                )(x, train)
                in_planes = out_planes
        return Linear(self.num_classes, name="fc" if imagenet else "linear")(global_avg_pool(x))

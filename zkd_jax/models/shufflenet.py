"""The reference's CIFAR ShuffleNets: ``ShuffleV1`` (groups 3) and ``ShuffleV2`` (net size 1).

**ShuffleV1**: stem 1x1 conv (24) + BN + ReLU at full resolution; three stages ``layer1..3`` of 4,
8, 4 bottlenecks reaching 240, 480, 960 channels; global average pooling; ``linear``. A bottleneck
is: grouped 1x1 conv to ``out / 4`` (groups 1 when the input has 24 channels, else 3), BN, ReLU,
channel shuffle, depthwise 3x3 (stride), BN, ReLU, grouped 1x1 conv (groups 3), BN; then
``relu(out + x)``; the first block of a stage (stride 2) instead returns
``relu(concat(out, avgpool3x3/2(x)))``, its ``out`` having ``stage width - in`` channels (the pool
counts the zero padding, PyTorch's default).

**ShuffleV2**: stem 1x1 conv (24) + BN + ReLU; three stages ``layer1..3`` = a down block then 3, 7,
3 basic blocks at 116, 232, 464 channels; ``conv2`` 1x1 (1024) + ``bn2`` + ReLU; global average
pooling; ``linear``. A basic block splits the channels in halves ``(x1, x2)``, maps
``x2 -> relu(bn3(conv3(bn2(dwconv2(relu(bn1(conv1(x2))))))))``, concatenates ``(x1, .)`` and
shuffles (2 groups). A down block (stride 2) concatenates a left branch
``relu(bn2(conv2(bn1(dw1(x)))))`` and a right branch
``relu(bn5(conv5(bn4(dw4(relu(bn3(conv3(x))))))))``, then shuffles.

The reference sets no initialization for either: convs and classifier use PyTorch's default
uniform, BN scale 1 / bias 0.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import (
    BatchNorm,
    Conv2d,
    Linear,
    avg_pool,
    channel_shuffle,
    global_avg_pool,
    torch_default_kernel,
)

Array = jax.Array

__all__ = [
    "ShuffleV1Bottleneck",
    "ShuffleNetV1",
    "ShuffleV2BasicBlock",
    "ShuffleV2DownBlock",
    "ShuffleNetV2",
]


def _conv(
    features: int, kernel: int, dtype: Any, name: str, stride: int = 1, groups: int = 1
) -> Conv2d:
    """A bias-free conv with PyTorch's default init and ``padding = kernel // 2``."""
    return Conv2d(
        features,
        kernel,
        stride,
        kernel // 2,
        groups=groups,
        kernel_init=torch_default_kernel,
        dtype=dtype,
        name=name,
    )


class ShuffleV1Bottleneck(nn.Module):
    """See the module docstring; ``out_planes`` excludes the concatenated shortcut channels."""

    out_planes: int
    stride: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        in_planes = x.shape[-1]
        mid = self.out_planes // 4
        g = 1 if in_planes == 24 else self.groups
        out = _conv(mid, 1, d, "conv1", groups=g)(x)
        out = nn.relu(BatchNorm(dtype=d, name="bn1")(out, train))
        out = channel_shuffle(out, g)
        out = _conv(mid, 3, d, "conv2", stride=self.stride, groups=mid)(out)
        out = nn.relu(BatchNorm(dtype=d, name="bn2")(out, train))
        out = _conv(self.out_planes, 1, d, "conv3", groups=self.groups)(out)
        out = BatchNorm(dtype=d, name="bn3")(out, train)
        if self.stride == 2:
            return nn.relu(jnp.concatenate([out, avg_pool(x, 3, 2, 1)], axis=-1))
        return nn.relu(out + x)


class ShuffleNetV1(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32)."""

    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        x = _conv(24, 1, d, "conv1")(x.astype(d))
        x = nn.relu(BatchNorm(dtype=d, name="bn1")(x, train))
        for stage, (planes, blocks) in enumerate(
            zip(self.out_planes, self.num_blocks, strict=True), start=1
        ):
            for i in range(blocks):
                stride = 2 if i == 0 else 1
                out = planes - x.shape[-1] if i == 0 else planes
                x = ShuffleV1Bottleneck(
                    out, stride, self.groups, dtype=d, name=f"layer{stage}_{i}"
                )(x, train)
        return Linear(self.num_classes, name="linear")(global_avg_pool(x))


class ShuffleV2BasicBlock(nn.Module):
    """Split in halves, transform the second half, concatenate, shuffle (2 groups)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        c = int(x.shape[-1] * 0.5)
        x1, x2 = x[..., :c], x[..., c:]
        out = _conv(c, 1, d, "conv1")(x2)
        out = nn.relu(BatchNorm(dtype=d, name="bn1")(out, train))
        out = _conv(c, 3, d, "conv2", groups=c)(out)
        out = BatchNorm(dtype=d, name="bn2")(out, train)
        out = _conv(c, 1, d, "conv3")(out)
        out = nn.relu(BatchNorm(dtype=d, name="bn3")(out, train))
        return channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches of ``out_planes / 2`` channels each, concatenated and shuffled."""

    out_planes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        c_in = x.shape[-1]
        mid = self.out_planes // 2
        left = _conv(c_in, 3, d, "conv1", stride=2, groups=c_in)(x)
        left = BatchNorm(dtype=d, name="bn1")(left, train)
        left = _conv(mid, 1, d, "conv2")(left)
        left = nn.relu(BatchNorm(dtype=d, name="bn2")(left, train))
        right = _conv(mid, 1, d, "conv3")(x)
        right = nn.relu(BatchNorm(dtype=d, name="bn3")(right, train))
        right = _conv(mid, 3, d, "conv4", stride=2, groups=mid)(right)
        right = BatchNorm(dtype=d, name="bn4")(right, train)
        right = _conv(mid, 1, d, "conv5")(right)
        right = nn.relu(BatchNorm(dtype=d, name="bn5")(right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32)."""

    out_channels: Sequence[int] = (116, 232, 464, 1024)
    num_blocks: Sequence[int] = (3, 7, 3)
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        x = _conv(24, 1, d, "conv1")(x.astype(d))
        x = nn.relu(BatchNorm(dtype=d, name="bn1")(x, train))
        for stage, (planes, blocks) in enumerate(
            zip(self.out_channels[:3], self.num_blocks, strict=True), 1
        ):
            x = ShuffleV2DownBlock(planes, dtype=d, name=f"layer{stage}_0")(x, train)
            for i in range(1, blocks + 1):
                x = ShuffleV2BasicBlock(dtype=d, name=f"layer{stage}_{i}")(x, train)
        x = _conv(self.out_channels[3], 1, d, "conv2")(x)
        x = nn.relu(BatchNorm(dtype=d, name="bn2")(x, train))
        return Linear(self.num_classes, name="linear")(global_avg_pool(x))

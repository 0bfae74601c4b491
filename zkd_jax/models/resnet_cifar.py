"""The CIFAR ResNets of the reference: ``resnet8 ... resnet110``, ``resnet8x4``, ``resnet32x4``.

Structure (He et al. 2016, CIFAR variant, as the reference builds it): a 3x3 stem conv + BN + ReLU,
three stages of ``n = (depth - 2) / 6`` basic blocks with ``num_filters[1:]`` channels and strides
1, 2, 2, global average pooling and a linear classifier ``fc``. A block's shortcut is a 1x1 conv +
BN (``downsample``) when the stride or the channel count changes, the identity otherwise.
Initialization: convs He-normal (fan_out), BN scale 1 / bias 0, ``fc`` PyTorch's default uniform.

PyTorch names map one-to-one: ``layer2.0.downsample.1.weight`` is
``params/layer2_0/downsample_1/scale``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool
from zkd_jax.models.resnet import BasicBlock

Array = jax.Array

__all__ = ["ResNetCifar"]


class ResNetCifar(nn.Module):
    """CIFAR ResNet, ``depth = 6 n + 2``: ``x [B, H, W, 3] -> logits [B, num_classes]``, float32."""

    depth: int
    num_filters: Sequence[int]
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if (self.depth - 2) % 6:
            raise ValueError(
                f"ResNetCifar depth must be 6n + 2 (got {self.depth}); use 8, 14, 20, ..."
            )
        n = (self.depth - 2) // 6
        nf = tuple(self.num_filters)
        x = Conv2d(nf[0], 3, 1, 1, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        inplanes = nf[0]
        for stage, (planes, stride) in enumerate(zip(nf[1:], (1, 2, 2), strict=True), start=1):
            for i in range(n):
                s = stride if i == 0 else 1
                x = BasicBlock(
                    planes,
                    s,
                    projection=(s != 1 or inplanes != planes),
                    projection_name="downsample",  # the reference's key: layerN.i.downsample.{0,1}
                    dtype=self.dtype,
                    name=f"layer{stage}_{i}",
                )(x, train)
                inplanes = planes
        return Linear(self.num_classes, name="fc")(global_avg_pool(x))

"""MobileNets of the reference: ``MobileNetV2`` (CIFAR, the reference's ``mobile_half``) and
``MobileNetV1`` (ImageNet).

**MobileNetV2** (expansion ``T = 6``, width 0.5): stem ``conv1`` (3x3/2 conv, BN, ReLU; 16
channels), seven stages ``blocks.{s}`` of inverted residuals with (expansion, channels, repeats,
stride) ``(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
(T, 320, 1, 1)`` (channels times the width), ``conv2`` (1x1 conv, BN, ReLU; 1280 channels), global
average pooling, ``classifier.0`` linear. An inverted residual is ``conv.0..7`` = 1x1 expand, BN,
ReLU, 3x3 depthwise (stride), BN, ReLU, 1x1 project, BN (always with the expansion conv, even at
expansion 1, as the reference); identity added when stride 1 and ``in == out``. Initialization:
convs He-normal (fan_out), BN 1 / 0, classifier normal(0, 0.01) with bias 0.

**MobileNetV1** (ImageNet): ``model.0`` = 3x3/2 conv (32), BN, ReLU; ``model.1..13`` = depthwise 3x3
(stride), BN, ReLU, pointwise 1x1, BN, ReLU; global average pooling; ``fc``. The reference sets no
initialization: every conv and the classifier use PyTorch's default uniform, BN 1 / 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import (
    BatchNorm,
    Conv2d,
    Linear,
    classifier_normal,
    global_avg_pool,
    torch_default_kernel,
)

Array = jax.Array

__all__ = ["InvertedResidual", "MobileNetV1", "MobileNetV2"]


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (stride) -> project (1x1, linear); identity if shapes allow."""

    out_planes: int
    stride: int
    expand_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        in_planes = x.shape[-1]
        hidden = in_planes * self.expand_ratio
        d = self.dtype
        out = Conv2d(hidden, 1, dtype=d, name="conv_0")(x)
        out = nn.relu(BatchNorm(dtype=d, name="conv_1")(out, train))
        out = Conv2d(hidden, 3, self.stride, 1, groups=hidden, dtype=d, name="conv_3")(out)
        out = nn.relu(BatchNorm(dtype=d, name="conv_4")(out, train))
        out = Conv2d(self.out_planes, 1, dtype=d, name="conv_6")(out)
        out = BatchNorm(dtype=d, name="conv_7")(out, train)
        if self.stride == 1 and in_planes == self.out_planes:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32); ``H``, ``W`` multiples of 32."""

    expansion: int = 6
    width_mult: float = 0.5
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        t = self.expansion
        setting = (
            (1, 16, 1, 1),
            (t, 24, 2, 1),
            (t, 32, 3, 2),
            (t, 64, 4, 2),
            (t, 96, 3, 1),
            (t, 160, 3, 2),
            (t, 320, 1, 1),
        )
        d = self.dtype
        x = Conv2d(int(32 * self.width_mult), 3, 2, 1, dtype=d, name="conv1_0")(x.astype(d))
        x = nn.relu(BatchNorm(dtype=d, name="conv1_1")(x, train))
        for s, (expand, c, repeats, stride) in enumerate(setting):
            out_planes = int(c * self.width_mult)
            for i in range(repeats):
                x = InvertedResidual(
                    out_planes, stride if i == 0 else 1, expand, dtype=d, name=f"blocks_{s}_{i}"
                )(x, train)
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = Conv2d(last, 1, dtype=d, name="conv2_0")(x)
        x = nn.relu(BatchNorm(dtype=d, name="conv2_1")(x, train))
        classifier = Linear(
            self.num_classes,
            kernel_init=classifier_normal,
            bias_init=nn.initializers.zeros,
            name="classifier_0",
        )
        return classifier(global_avg_pool(x))


class MobileNetV1(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32)."""

    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        d = self.dtype
        init = torch_default_kernel
        x = Conv2d(32, 3, 2, 1, kernel_init=init, dtype=d, name="model_0_0")(x.astype(d))
        x = nn.relu(BatchNorm(dtype=d, name="model_0_1")(x, train))
        dw_setting = (
            (64, 1),
            (128, 2),
            (128, 1),
            (256, 2),
            (256, 1),
            (512, 2),
            (512, 1),
            (512, 1),
            (512, 1),
            (512, 1),
            (512, 1),
            (1024, 2),
            (1024, 1),
        )
        for i, (out_planes, stride) in enumerate(dw_setting, start=1):
            c = x.shape[-1]
            x = Conv2d(c, 3, stride, 1, groups=c, kernel_init=init, dtype=d, name=f"model_{i}_0")(x)
            x = nn.relu(BatchNorm(dtype=d, name=f"model_{i}_1")(x, train))
            x = Conv2d(out_planes, 1, kernel_init=init, dtype=d, name=f"model_{i}_3")(x)
            x = nn.relu(BatchNorm(dtype=d, name=f"model_{i}_4")(x, train))
        return Linear(self.num_classes, name="fc")(global_avg_pool(x))

"""Wide ResNets of the reference, ``wrn_{depth}_{widen}`` (Zagoruyko & Komodakis 2016).

Structure: a 3x3 stem conv (16 channels), three ``NetworkBlock`` stages (``block1..3``) of
``n = (depth - 4) / 6`` pre-activation blocks with ``16 k, 32 k, 64 k`` channels and strides 1, 2,
2, a final BN + ReLU (``bn1``), global average pooling, a linear classifier ``fc``. Dropout rate 0.

A block with ``in == out`` channels computes ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``; a block
that changes the width applies ``relu(bn1(.))`` to its input first and feeds *that* to both
branches, the shortcut being a 1x1 conv (``convShortcut``, no BN), exactly as the reference.
Initialization: convs He-normal (fan_out), BN scale 1 / bias 0, ``fc`` weight PyTorch's default
uniform and bias 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool

Array = jax.Array

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block; see the module docstring for the two shortcut cases."""

    out_planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        equal_in_out = x.shape[-1] == self.out_planes
        act = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        out = Conv2d(self.out_planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(act)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = Conv2d(self.out_planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        if equal_in_out:
            return x + out
        shortcut = Conv2d(self.out_planes, 1, self.stride, dtype=self.dtype, name="convShortcut")
        return shortcut(act) + out


class NetworkBlock(nn.Module):
    """``num_layers`` blocks named ``layer_0 ...``; the first carries the stride."""

    num_layers: int
    out_planes: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(self.num_layers):
            stride = self.stride if i == 0 else 1
            x = WideBasicBlock(self.out_planes, stride, dtype=self.dtype, name=f"layer_{i}")(
                x, train
            )
        return x


class WideResNet(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32)."""

    depth: int
    widen_factor: int
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if (self.depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 (got {self.depth}); use 16, 22, 28, 40."
            )
        n = (self.depth - 4) // 6
        k = self.widen_factor
        x = Conv2d(16, 3, 1, 1, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        for i, (planes, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            x = NetworkBlock(n, planes, stride, dtype=self.dtype, name=f"block{i}")(x, train)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        fc = Linear(self.num_classes, bias_init=nn.initializers.zeros, name="fc")
        return fc(global_avg_pool(x))

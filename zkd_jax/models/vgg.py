"""The reference's CIFAR VGGs with BatchNorm: ``vgg8, vgg11, vgg13, vgg16, vgg19``.

Structure: five blocks ``block0..block4``; each is a run of ``3x3 conv (with bias) -> BN -> ReLU``
(PyTorch ``Sequential`` indices: conv ``3 j``, BN ``3 j + 1``). A 2x2/2 max pool follows blocks 0, 1
and 2, and block 3 only when the input is 64 pixels high (never for CIFAR's 32); after block 4 a
global average pool and a linear ``classifier``. Initialization: convs He-normal (fan_out) with bias
0, BN scale 1 / bias 0, classifier normal(0, 0.01) with bias 0.
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
    classifier_normal,
    global_avg_pool,
    max_pool,
)

Array = jax.Array

__all__ = ["VGG", "VGG_CONFIGS"]

#: Channels of each conv in each of the five blocks (the reference's cfg "S", "A", "B", "D", "E").
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    """``x [B, H, W, 3] -> logits [B, num_classes]`` (float32); ``cfg`` as :data:`VGG_CONFIGS`."""

    cfg: Sequence[Sequence[int]]
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        height = x.shape[1]
        x = x.astype(self.dtype)
        for b, channels in enumerate(self.cfg):
            for j, c in enumerate(channels):
                x = Conv2d(
                    c,
                    3,
                    1,
                    1,
                    use_bias=True,
                    bias_init=nn.initializers.zeros,
                    dtype=self.dtype,
                    name=f"block{b}_{3 * j}",
                )(x)
                x = nn.relu(BatchNorm(dtype=self.dtype, name=f"block{b}_{3 * j + 1}")(x, train))
            if b < 3 or (b == 3 and height == 64):
                x = max_pool(x, 2, 2)
        classifier = Linear(
            self.num_classes,
            kernel_init=classifier_normal,
            bias_init=nn.initializers.zeros,
            name="classifier",
        )
        return classifier(global_avg_pool(x))

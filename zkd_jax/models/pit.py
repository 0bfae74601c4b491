"""PiT-Ti, the pooling-based ViT: ``pit_ti`` of ``cifar100_224``.

``patch_embed.conv`` (k16 s8 p0, bias) -> 64 x 27 x 27, plus ``pos_embed`` (stored as PyTorch's
``[1, 64, 27, 27]``); ``cls_token`` (64, no position). Three stages ``transformers_{0,1,2}`` of
dims 64/128/256, depths 2/6/4, heads 2/4/8, MLP 4, qkv bias; each runs its blocks on
``[cls, h w tokens]``. Between stages ``pools_i``: a depthwise conv (k3 s2 p1, bias, groups =
C_in, C_out = 2 C_in: outputs 2g, 2g+1 read input g) on the grid (27 -> 14 -> 7) and ``fc``
(Linear C_in -> C_out) on the class token. ``norm`` on the class token, ``head``.

Init: LayerNorm 1/0; Linear and conv PyTorch's default; ``pos_embed``, ``cls_token`` normal(.02).
Drop path ``rate * i / 12`` over the 12 blocks (i = 0..11: max 0.0917, not 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.deit import PatchEmbed
from zkd_jax.models.layers import Conv2d, torch_default_kernel
from zkd_jax.models.vit_layers import Block, LayerNorm, dense, token_param

Array = jax.Array

__all__ = ["PiT"]


class _Stage(nn.Module):
    """``blocks_i`` over ``[cls..., tokens]``: ``[B, N, d] -> [B, N, d]``."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    rates: Sequence[float]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(self.depth):
            x = Block(self.dim, self.num_heads, self.mlp_ratio, self.rates[i], init="torch",
                      dtype=self.dtype, name=f"blocks_{i}")(x, train)
        return x


class _Pool(nn.Module):
    """Depthwise conv (grid) and Linear (class token), both ``C -> 2 C``."""

    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid: Array, cls: Array) -> tuple[Array, Array]:
        c = grid.shape[-1]
        grid = Conv2d(self.out_dim, 3, 2, 1, groups=c, use_bias=True,
                      kernel_init=torch_default_kernel, dtype=self.dtype, name="conv")(grid)
        cls = dense(self.out_dim, init="torch", dtype=self.dtype, name="fc")(cls)
        return grid, cls


class PiT(nn.Module):
    """PiT: ``[B, H, W, 3] -> [B, num_classes]`` (the class head, train and eval)."""

    num_classes: int = 100
    img_size: int = 224
    patch_size: int = 16
    stride: int = 8
    dims: Sequence[int] = (64, 128, 256)
    depths: Sequence[int] = (2, 6, 4)
    heads: Sequence[int] = (2, 4, 8)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32

    def drop_path_schedule(self) -> list[float]:
        """The drop-path rate of each block, in order."""
        return [self.drop_path_rate * i / sum(self.depths) for i in range(sum(self.depths))]

    @nn.compact
    def __call__(self, x: Array, train: bool, return_heads: bool = False):
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"PiT built for {self.img_size} px got images {x.shape[1:3]}; resize the input "
                "or build the model with img_size matching it."
            )
        b = x.shape[0]
        g = (self.img_size - self.patch_size) // self.stride + 1
        d0 = self.dims[0]
        pos = token_param(self, "pos_embed", (1, d0, g, g))  # PyTorch layout [1, C, H, W]
        cls = token_param(self, "cls_token", (1, 1, d0))
        x = PatchEmbed(d0, self.patch_size, self.stride, conv_name="conv", dtype=self.dtype,
                       name="patch_embed")(x.astype(self.dtype))
        x = x + pos.transpose(0, 2, 3, 1).astype(self.dtype)
        cls = jnp.broadcast_to(cls, (b, 1, d0)).astype(self.dtype)
        schedule = self.drop_path_schedule()
        start = 0
        for s, (dim, depth, nh) in enumerate(zip(self.dims, self.depths, self.heads, strict=True)):
            rates = schedule[start:start + depth]
            start += depth
            h, w = x.shape[1:3]
            seq = jnp.concatenate([cls, x.reshape(b, h * w, dim)], axis=1)
            seq = _Stage(dim, depth, nh, self.mlp_ratio, rates, dtype=self.dtype,
                         name=f"transformers_{s}")(seq, train)
            cls, x = seq[:, :1], seq[:, 1:].reshape(b, h, w, dim)
            if s + 1 < len(self.dims):
                x, cls = _Pool(self.dims[s + 1], dtype=self.dtype, name=f"pools_{s}")(x, cls)
        cls = LayerNorm(dtype=self.dtype, name="norm")(cls[:, 0]).astype(jnp.float32)
        head = dense(self.num_classes, init="torch", dtype=jnp.float32, name="head")(cls)
        return {"cls": head} if return_heads else head

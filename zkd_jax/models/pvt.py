"""PVT-Ti, the pyramid ViT with spatial-reduction attention: ``pvt_ti``.

Four stages ``i = 1..4``: ``patch_embed{i}`` (``proj`` conv k = s = 4/2/2/2 with bias, then
LayerNorm ``norm``) -> grids 56, 28, 14, 7; dims 64/128/320/512, 2 blocks each (``block{i}_{j}``),
heads 1/2/5/8, MLP 8/8/4/4, spatial reduction 8/4/2/1; learned ``pos_embed{i}`` (3136, 784, 196,
50 tokens); the class token only in stage 4 (``pos_embed4`` slot 0). Final ``norm``, ``head`` on
the class token.

Attention with reduction ``sr > 1`` (``[B, N, d]`` on an ``H x W`` grid): ``q = q(x)``; the keys and
values come from ``kv(norm(sr(grid)))`` with ``sr`` a conv k = s = sr (bias) -> ``(H/sr)(W/sr)``
tokens; ``kv`` is Linear(d, 2 d) laid out ``[2, heads, hd]``; all biased; ``proj`` at the end.

Init: Linear normal(.02), bias 0; LayerNorm 1/0; convs PyTorch's default; positions and class token
normal(.02). Drop path ``linspace(0, rate, 8)`` over the 8 blocks (one rate for both branches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.deit import PatchEmbed
from zkd_jax.models.layers import Conv2d, torch_default_kernel
from zkd_jax.models.vit_layers import (
    Block, LayerNorm, attend, dense, drop_path_rates, token_param,
)

Array = jax.Array

__all__ = ["PVT", "SRAttention"]


class SRAttention(nn.Module):
    """Spatial-reduction attention: ``x [B, N, d]`` (grid ``hw = (H, W)``) -> ``[B, N, d]``."""

    dim: int
    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int]) -> Array:
        b, n, _ = x.shape
        hd = self.dim // self.num_heads
        q = dense(self.dim, init="normal02", dtype=self.dtype, name="q")(x)
        q = q.reshape(b, n, self.num_heads, hd)
        if self.sr_ratio > 1:
            h, w = hw
            kv_in = Conv2d(self.dim, self.sr_ratio, self.sr_ratio, use_bias=True,
                           kernel_init=torch_default_kernel, dtype=self.dtype,
                           name="sr")(x.reshape(b, h, w, self.dim))
            kv_in = kv_in.reshape(b, -1, self.dim)
            kv_in = LayerNorm(dtype=self.dtype, name="norm")(kv_in)
        else:
            kv_in = x
        kv = dense(2 * self.dim, init="normal02", dtype=self.dtype, name="kv")(kv_in)
        kv = kv.reshape(b, kv.shape[1], 2, self.num_heads, hd)
        y = attend(q, kv[:, :, 0], kv[:, :, 1])
        return dense(self.dim, init="normal02", dtype=self.dtype, name="proj")(y)


class PVT(nn.Module):
    """PVT (v1): ``[B, H, W, 3] -> [B, num_classes]`` (the class head, train and eval)."""

    num_classes: int = 100
    img_size: int = 224
    patch_sizes: Sequence[int] = (4, 2, 2, 2)
    dims: Sequence[int] = (64, 128, 320, 512)
    depths: Sequence[int] = (2, 2, 2, 2)
    heads: Sequence[int] = (1, 2, 5, 8)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32

    def drop_path_schedule(self) -> list[float]:
        """The drop-path rate of each block, in order."""
        return drop_path_rates(self.drop_path_rate, sum(self.depths))

    @nn.compact
    def __call__(self, x: Array, train: bool, return_heads: bool = False):
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"PVT built for {self.img_size} px got images {x.shape[1:3]}; resize the input "
                "or build the model with img_size matching it."
            )
        b = x.shape[0]
        grids, g = [], self.img_size
        for p in self.patch_sizes:
            g //= p
            grids.append(g)
        n_stages = len(self.dims)
        pos = [
            token_param(self, f"pos_embed{i + 1}",
                        (1, grids[i] ** 2 + (i + 1 == n_stages), self.dims[i]))
            for i in range(n_stages)
        ]
        cls = token_param(self, "cls_token", (1, 1, self.dims[-1]))
        rates = self.drop_path_schedule()
        x = x.astype(self.dtype)
        k = 0
        for i in range(n_stages):
            dim = self.dims[i]
            x = PatchEmbed(dim, self.patch_sizes[i], self.patch_sizes[i], conv_name="proj",
                           norm=True, dtype=self.dtype, name=f"patch_embed{i + 1}")(x)
            h, w = x.shape[1:3]
            x = x.reshape(b, h * w, dim)
            if i + 1 == n_stages:
                x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, dim)).astype(self.dtype), x], 1)
            x = x + pos[i].astype(self.dtype)
            for j in range(self.depths[i]):
                attn = _attn_factory(dim, self.heads[i], self.sr_ratios[i], self.dtype)
                x = Block(dim, self.heads[i], self.mlp_ratios[i], rates[k], attn_factory=attn,
                          dtype=self.dtype, name=f"block{i + 1}_{j}")(x, train, (h, w))
                k += 1
            if i + 1 < n_stages:
                x = x.reshape(b, h, w, dim)
        x = LayerNorm(dtype=self.dtype, name="norm")(x[:, 0]).astype(jnp.float32)
        head = dense(self.num_classes, init="normal02", dtype=jnp.float32, name="head")(x)
        return {"cls": head} if return_heads else head


def _attn_factory(dim: int, heads: int, sr: int, dtype: Any):
    def make(name: str) -> SRAttention:
        return SRAttention(dim, heads, sr, dtype=dtype, name=name)

    return make


"""DeiT-Ti with a distillation token: ``deit_ti`` of ``cifar100_224``.

``x [B, 224, 224, 3]`` -> ``patch_embed.projection`` (conv 16/16, bias) -> 196 tokens; sequence
``[cls, dist, patches] + pos_embed`` (198 x 192); 12 pre-norm blocks (dim 192, 3 heads, MLP 4,
qkv bias); final ``norm``; ``head`` on token 0 (class head) and ``distill_head`` on token 1.

Outputs, as the reference's forward: train mode returns the class head ``[B, C]``, eval mode the
mean of both heads ``(cls + dist) / 2``; ``return_heads=True`` returns ``{"cls": ..., "dist": ...}``
in either mode (what the distillation objective needs: CE on ``cls``, KD on ``dist``).

Initialization: Linear normal(.02), bias 0; both heads zero; patch conv PyTorch's default; tokens
and positions normal(.02); LayerNorm 1/0. Drop path ``linspace(0, drop_path_rate, depth)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import Conv2d, torch_default_kernel
from zkd_jax.models.vit_layers import Block, LayerNorm, dense, drop_path_rates, token_param

Array = jax.Array

__all__ = ["DeiT", "PatchEmbed"]


class PatchEmbed(nn.Module):
    """``Conv2d(k, s, p, bias)`` named ``conv_name``, optionally followed by LayerNorm ``norm``:
    ``[B, H, W, C] -> [B, H', W', features]`` (PyTorch's default conv init)."""

    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    conv_name: str = "projection"
    norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=True,
                   kernel_init=torch_default_kernel, dtype=self.dtype, name=self.conv_name)(x)
        if self.norm:
            x = LayerNorm(dtype=self.dtype, name="norm")(x)
        return x


class DeiT(nn.Module):
    """DeiT with class and distillation tokens: ``[B, H, W, 3] -> [B, num_classes]`` (see module)."""

    num_classes: int = 100
    img_size: int = 224
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32

    def drop_path_schedule(self) -> list[float]:
        """The drop-path rate of each block, in order."""
        return drop_path_rates(self.drop_path_rate, self.depth)

    @nn.compact
    def __call__(self, x: Array, train: bool, return_heads: bool = False):
        b = x.shape[0]
        grid = self.img_size // self.patch_size
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"DeiT built for {self.img_size} px got images {x.shape[1:3]}; resize the input "
                "or build the model with img_size matching it."
            )
        cls = token_param(self, "cls_token", (1, 1, self.dim))
        pos = token_param(self, "pos_embed", (1, grid * grid + 2, self.dim))
        dist = token_param(self, "distill_token", (1, 1, self.dim))
        x = PatchEmbed(self.dim, self.patch_size, self.patch_size, dtype=self.dtype,
                       name="patch_embed")(x.astype(self.dtype))
        x = x.reshape(b, grid * grid, self.dim)
        tokens = [jnp.broadcast_to(t, (b, 1, self.dim)).astype(self.dtype) for t in (cls, dist)]
        x = jnp.concatenate([*tokens, x], axis=1) + pos.astype(self.dtype)
        for i, rate in enumerate(self.drop_path_schedule()):
            x = Block(self.dim, self.num_heads, self.mlp_ratio, rate, dtype=self.dtype,
                      name=f"layers_{i}")(x, train)
        x = LayerNorm(dtype=self.dtype, name="norm")(x).astype(jnp.float32)
        head_cls = dense(self.num_classes, init="zeros", dtype=jnp.float32, name="head")(x[:, 0])
        head_dist = dense(self.num_classes, init="zeros", dtype=jnp.float32,
                          name="distill_head")(x[:, 1])
        if return_heads:
            return {"cls": head_cls, "dist": head_dist}
        return head_cls if train else (head_cls + head_dist) / 2

"""T2T-ViT-7: ``t2t_vit_7`` of ``cifar100_224``.

Tokens-to-token module ``t2t_module``: soft split ``Unfold(7, s4, p2)`` -> ``[B, 3136, 147]``
(features ``(c, kh, kw)``, c slowest) -> Performer layer ``attention_0`` (147 -> 64) -> 56x56 grid ->
``Unfold(3, s2, p1)`` -> 784 x 576 -> Performer ``attention_1`` (576 -> 64) -> 28x28 ->
``Unfold(3, s2, p1)`` -> 196 x 576 -> ``projection`` (576 -> 256). Then ``[cls, tokens]`` plus the
fixed sinusoid table (197 x 256), 7 blocks (dim 256, 4 heads, MLP 2, **no qkv bias**), ``norm``,
``head`` on the class token.

Performer layer (input ``x [B, T, c]``): ``h = norm1(x)``; ``k, q, v = split(qkv_transform(h))``
(that order, 64 each); ``phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m)`` with the fixed ``w [m=32, 64]``;
``y = phi(q) (sum_t v_t phi(k_t)^T)^T / (phi(q) . sum_t phi(k_t) + 1e-8)``; ``y = v + projection(y)``
(no residual on ``x``); ``y = y + mlp(norm2(y))`` (hidden 64).

Fixed tensors (``pos_embed`` and each Performer's ``w``) live in the ``buffers`` collection, not in
``params``: they are part of the PyTorch state_dict but not trained. ``w`` has orthogonal rows
scaled by ``sqrt(m)``, drawn from the ``params`` RNG at init (the reference draws it from torch's
RNG when building; a converted checkpoint brings its own). Init: Linear normal(.02), bias 0;
``cls_token`` normal(.02); LayerNorm 1/0. Drop path ``linspace(0, rate, depth)`` on the 7 blocks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zkd_jax.models.vit_layers import Block, LayerNorm, Mlp, dense, drop_path_rates, token_param

Array = jax.Array

__all__ = ["T2TViT", "sinusoid_table", "unfold"]


def unfold(x: Array, kernel: int, stride: int, padding: int) -> Array:
    """``torch.nn.Unfold`` on NHWC, tokens first: ``[B, H, W, C] -> [B, H' W', C k k]``.

    Token ``(i, j)`` (row-major) holds ``xp[b, s i + u, s j + v, c]`` at feature ``c k^2 + u k + v``
    (channel slowest, as PyTorch orders ``(c, kh, kw)``); ``xp`` is zero-padded by ``padding``.
    """
    b = x.shape[0]
    # One convolution with one-hot filters; its feature axis is ordered (c, kh, kw), c slowest.
    # HIGHEST precision: a copy, not rounded to TF32/bfloat16 passes on accelerators.
    patches = jax.lax.conv_general_dilated_patches(
        x, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    )
    return patches.reshape(b, -1, patches.shape[-1])


def sinusoid_table(n_position: int, dim: int) -> np.ndarray:
    """``[1, n, d]`` float32: ``angle = p / 10000^(2 floor(j / 2) / d)``; sin at even j, cos at odd."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table[None].astype(np.float32)


def _orthogonal_features(key: Array, m: int, d: int) -> Array:
    """``[m, d]`` with orthonormal rows times ``sqrt(m)`` (m <= d)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (d, m), jnp.float32))
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q.T * jnp.sqrt(jnp.float32(m))


class PerformerAttention(nn.Module):
    """Performer attention of the T2T module: ``h [B, T, c] -> v + projection(y)  [B, T, dim]``."""

    dim: int = 64
    m: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array) -> Array:
        w = self.variable("buffers", "w", lambda: _orthogonal_features(
            self.make_rng("params"), self.m, self.dim)).value
        kqv = dense(3 * self.dim, init="normal02", dtype=self.dtype, name="qkv_transform")(h)
        k, q, v = (kqv[..., i * self.dim:(i + 1) * self.dim].astype(jnp.float32) for i in range(3))

        def phi(u):  # [B, T, d] -> [B, T, m]
            sq = 0.5 * jnp.sum(u * u, axis=-1, keepdims=True)
            return jnp.exp(u @ w.T - sq) / np.sqrt(self.m)

        kp, qp = phi(k), phi(q)
        denom = qp @ jnp.sum(kp, axis=1)[..., None]  # [B, T, 1]
        kptv = jnp.einsum("btd,btm->bdm", v, kp)
        y = jnp.einsum("btm,bdm->btd", qp, kptv) / (denom + 1e-8)
        y = dense(self.dim, init="normal02", dtype=self.dtype, name="projection")(y)
        return v.astype(self.dtype) + y


class PerformerLayer(nn.Module):
    """``y = attn(norm1 x); y + mlp(norm2 y)``: ``[B, T, c] -> [B, T, dim]``."""

    dim: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = PerformerAttention(self.dim, dtype=self.dtype, name="attn")(
            LayerNorm(dtype=self.dtype, name="norm1")(x))
        return y + Mlp(self.dim, init="normal02", dtype=self.dtype, name="mlp")(
            LayerNorm(dtype=self.dtype, name="norm2")(y))


class T2TModule(nn.Module):
    """Soft splits and Performers: ``[B, H, W, 3] -> [B, (H / 16)^2, embed_dim]``."""

    embed_dim: int = 256
    token_dim: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b = x.shape[0]
        t = unfold(x, 7, 4, 2)
        for i in range(2):
            t = PerformerLayer(self.token_dim, dtype=self.dtype, name=f"attention_{i}")(t)
            g = int(round(t.shape[1] ** 0.5))
            t = unfold(t.reshape(b, g, g, self.token_dim), 3, 2, 1)
        return dense(self.embed_dim, init="normal02", dtype=self.dtype, name="projection")(t)


class T2TViT(nn.Module):
    """T2T-ViT: ``[B, H, W, 3] -> [B, num_classes]`` (the class head, train and eval)."""

    num_classes: int = 100
    img_size: int = 224
    dim: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_ratio: float = 2.0
    token_dim: int = 64
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32

    def drop_path_schedule(self) -> list[float]:
        """The drop-path rate of each block, in order."""
        return drop_path_rates(self.drop_path_rate, self.depth)

    @nn.compact
    def __call__(self, x: Array, train: bool, return_heads: bool = False):
        if x.shape[1:3] != (self.img_size, self.img_size) or self.img_size % 16:
            raise ValueError(
                f"T2T-ViT built for {self.img_size} px (a multiple of 16) got images "
                f"{x.shape[1:3]}; resize the input or build it with the matching img_size."
            )
        b = x.shape[0]
        n = (self.img_size // 16) ** 2
        cls = token_param(self, "cls_token", (1, 1, self.dim))
        pos = self.variable("buffers", "pos_embed", lambda: jnp.asarray(
            sinusoid_table(n + 1, self.dim))).value
        x = T2TModule(self.dim, self.token_dim, dtype=self.dtype, name="t2t_module")(
            x.astype(self.dtype))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(self.dtype), x], 1)
        x = x + pos.astype(self.dtype)
        for i, rate in enumerate(self.drop_path_schedule()):
            x = Block(self.dim, self.num_heads, self.mlp_ratio, rate, qkv_bias=False,
                      dtype=self.dtype, name=f"layers_{i}")(x, train)
        x = LayerNorm(dtype=self.dtype, name="norm")(x[:, 0]).astype(jnp.float32)
        head = dense(self.num_classes, init="normal02", dtype=jnp.float32, name="head")(x)
        return {"cls": head} if return_heads else head

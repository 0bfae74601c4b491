"""Transformer building blocks of the reference's ViT students, Flax linen.

Semantics shared by DeiT-Ti, T2T-ViT-7, PiT-Ti and PVT-Ti (the pycls fork ``tiny-transformers``):

* pre-norm block ``x = x + DP(attn(LN1 x)); x = x + DP(mlp(LN2 x))``, LayerNorm eps ``1e-6``;
* multi-head self-attention: ``qkv = Linear(d, 3 d)(x)`` laid out ``[3, heads, d / heads]``
  (q, k, v), ``softmax(q k^T * hd^-1/2) v``, then ``projection``; dropouts are 0 in every config;
* MLP ``fc2(GELU(fc1 x))`` with the exact (erf) GELU;
* DropPath (stochastic depth): in train mode each *sample*'s branch is kept with probability
  ``1 - p`` and scaled by ``1 / (1 - p)``; it draws from the ``"dropout"`` RNG stream.

Parameters are float32; ``dtype`` is the compute dtype; attention softmax and LayerNorm statistics
run in float32. Submodule names mirror the PyTorch ``state_dict`` (``layers.3.attn.qkv_transform``
<-> ``layers_3/attn/qkv_transform``). Inputs are token sequences ``[B, N, d]``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zkd_jax.models.layers import Linear, torch_default_kernel

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LN_EPS",
    "LayerNorm",
    "Mlp",
    "drop_path_rates",
    "normal_02",
    "token_param",
    "zeros",
]

LN_EPS = 1e-6

#: ``trunc_normal_(std=.02)`` with timm's absolute bounds +-2 (100 standard deviations): a plain
#: normal in practice; also T2T's ``normal_(std=.02)``.
normal_02: Initializer = nn.initializers.normal(0.02)
zeros: Initializer = nn.initializers.zeros


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """``torch.linspace(0, rate, depth)`` (float32 values, as the reference builds them)."""
    return [float(v) for v in np.linspace(0.0, rate, depth, dtype=np.float32)]


def token_param(module: nn.Module, name: str, shape: tuple[int, ...]) -> Array:
    """A learned token / position table (``cls_token``, ``pos_embed`` ...), normal(0.02), float32."""
    return module.param(name, normal_02, shape, jnp.float32)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(d, eps)`` over the last axis: params ``scale`` (weight) and ``bias``.

    Statistics in float32 (biased variance), output in ``dtype``.
    """

    epsilon: float = LN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample: ``x * keep / (1 - rate)``, ``keep ~ Bernoulli(1 - rate)`` of
    shape ``[B, 1, ..., 1]``; identity in eval mode or at ``rate == 0``. RNG stream ``"dropout"``."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate <= 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
        return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


def _linear(features: int, init: str, dtype: Any, name: str) -> Linear:
    """A Linear with the initialization ``init``: "normal02" (normal .02, bias 0), "torch"
    (PyTorch's default) or "zeros" (DeiT's heads)."""
    if init == "normal02":
        return Linear(features, kernel_init=normal_02, bias_init=zeros, dtype=dtype, name=name)
    if init == "zeros":
        return Linear(features, kernel_init=zeros, bias_init=zeros, dtype=dtype, name=name)
    return Linear(features, kernel_init=torch_default_kernel, dtype=dtype, name=name)


class _LinearNoBias(nn.Module):
    """``nn.Linear(bias=False)``: ``x @ kernel``."""

    features: int
    kernel_init: Initializer = normal_02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        return x.astype(self.dtype) @ kernel.astype(self.dtype)


def dense(features: int, *, init: str, dtype: Any, name: str, use_bias: bool = True) -> nn.Module:
    """A ``torch.nn.Linear`` named ``name`` with the initialization ``init`` (see ``_linear``)."""
    if use_bias:
        return _linear(features, init, dtype, name)
    kernel_init = torch_default_kernel if init == "torch" else normal_02
    return _LinearNoBias(features, kernel_init=kernel_init, dtype=dtype, name=name)


def attend(q: Array, k: Array, v: Array) -> Array:
    """``softmax(q k^T / sqrt(hd)) v`` per head: q ``[B, N, h, hd]``, k, v ``[B, M, h, hd]`` ->
    ``[B, N, h * hd]``; logits and softmax in float32, products in the inputs' dtype."""
    hd = q.shape[-1]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (hd**-0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    return out.reshape(*out.shape[:2], -1)


class Attention(nn.Module):
    """Self-attention ``[B, N, d] -> [B, N, d]`` with ``qkv_transform`` and ``projection``."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    init: str = "normal02"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, _ = x.shape
        hd = self.dim // self.num_heads
        qkv = dense(3 * self.dim, init=self.init, dtype=self.dtype, name="qkv_transform",
                    use_bias=self.qkv_bias)(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
        y = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return dense(self.dim, init=self.init, dtype=self.dtype, name="projection")(y)


class Mlp(nn.Module):
    """``fc2(GELU_erf(fc1 x))``: ``[..., d] -> [..., out]`` (``out`` defaults to ``d``)."""

    hidden: int
    out: int | None = None
    init: str = "normal02"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.out or x.shape[-1]
        h = dense(self.hidden, init=self.init, dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        return dense(out, init=self.init, dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x += DP(attn(norm1 x)); x += DP(mlp(norm2 x))``.

    ``attn`` is an :class:`Attention` (``dim``, ``num_heads``, ``qkv_bias``) unless ``attn_factory``
    builds another attention module (PVT's spatial reduction); it is called as ``attn(h, *args)``.
    """

    dim: int
    num_heads: int
    mlp_ratio: float
    drop_path: float = 0.0
    qkv_bias: bool = True
    init: str = "normal02"
    attn_factory: Callable[..., nn.Module] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, *attn_args: Any) -> Array:
        if self.attn_factory is None:
            attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.init, self.dtype,
                             name="attn")
        else:
            attn = self.attn_factory(name="attn")
        dp = DropPath(self.drop_path)
        x = x.astype(self.dtype)
        x = x + dp(attn(LayerNorm(dtype=self.dtype, name="norm1")(x), *attn_args), train)
        hidden = int(self.dim * self.mlp_ratio)
        h = Mlp(hidden, init=self.init, dtype=self.dtype, name="mlp")(
            LayerNorm(dtype=self.dtype, name="norm2")(x)
        )
        return x + dp(h, train)

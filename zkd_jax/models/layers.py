"""Layers with PyTorch semantics in NHWC: Conv2d, Linear, BatchNorm, pooling and initializers.

Every layer keeps its parameters in float32 and computes in ``dtype`` (bfloat16 for mixed
precision). Parameter names are the Flax conventions (``kernel``, ``bias``, ``scale``; running
statistics ``mean``/``var`` in the ``batch_stats`` collection) so that one rule maps a PyTorch
``state_dict`` onto them (see :mod:`zkd_jax.io.torch_weights`).

Layouts: a conv kernel is ``(kh, kw, in / groups, out)`` (PyTorch ``(out, in / groups, kh, kw)``);
a linear kernel is ``(in, out)`` (PyTorch ``(out, in)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

__all__ = [
    "BatchNorm",
    "CONV_IMPLS",
    "Conv2d",
    "Linear",
    "avg_pool",
    "channel_shuffle",
    "classifier_normal",
    "conv2d",
    "conv_implementation",
    "folded_batchnorm",
    "global_avg_pool",
    "he_normal_fan_out",
    "max_pool",
    "torch_default_bias",
    "torch_default_kernel",
]

# --------------------------------------------------------------------------------------------------
# Initializers
# --------------------------------------------------------------------------------------------------

#: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: normal, std ``sqrt(2 / (out kh kw))``.
#: Flax's fan_out for a ``(kh, kw, in/g, out)`` kernel is ``out * kh * kw``, as in PyTorch (groups
#: do not divide it).
he_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: PyTorch's default kernel init (``kaiming_uniform_(a=sqrt(5))``): uniform in ``+-1/sqrt(fan_in)``,
#: ``fan_in = in / groups * kh * kw`` (``in`` for a linear layer).
torch_default_kernel: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

#: ``normal_(0, 0.01)``: the VGG and MobileNetV2 classifiers.
classifier_normal: Initializer = nn.initializers.normal(0.01)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init, uniform in ``+-1/sqrt(fan_in)`` (fan_in is not in its shape)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------------------------------
# Convolution: XLA's convolution, or the same sum as one matrix product
# --------------------------------------------------------------------------------------------------

#: "xla": ``lax.conv_general_dilated`` (cuDNN on GPU). "matmul": patches (``kh kw`` shifted views
#: concatenated on channels) times the ``(kh kw in, out)`` kernel, one ``dot_general``.
CONV_IMPLS = ("xla", "matmul")
_CONV_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("zkd_conv_impl", default="xla")


@contextlib.contextmanager
def conv_implementation(impl: str):
    """Within the block, :class:`Conv2d` (``groups == 1``) traces its convolution as ``impl``.

    Read when a model is *traced*, like ``jax.default_matmul_precision``; enter it inside the
    function that ``jax.jit`` traces. ``zkd_jax.step.multi``'s ``"vmap_matmul"`` form uses it so
    that ``jax.vmap`` over K students' kernels makes batched matrix products (``dot_general`` with
    a K batch dimension) instead of K-group convolutions.

    Raises:
      ValueError: ``impl`` is not one of ``CONV_IMPLS``.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv implementation {impl!r} is not one of {', '.join(CONV_IMPLS)}.")
    token = _CONV_IMPL.set(impl)
    try:
        yield
    finally:
        _CONV_IMPL.reset(token)


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0, groups: int = 1,
           impl: str | None = None) -> Array:
    """``y[b, h, w, o] = sum_{i, j, c} xp[b, s h + i, s w + j, c] kernel[i, j, c, o]``.

    ``x [B, H, W, Cin]`` (``xp``: zero-padded by ``padding`` on each side), ``kernel
    [kh, kw, Cin / groups, Cout]`` -> ``[B, H', W', Cout]``, ``H' = (H + 2 p - kh) // s + 1``.
    ``impl`` (default: the :func:`conv_implementation` in force, else "xla") picks how: both give
    the same sum up to float rounding (order of accumulation); "matmul" serves ``groups == 1``
    only and falls back to "xla" otherwise.
    """
    impl = impl or _CONV_IMPL.get()
    if impl == "matmul" and groups == 1:
        return _conv2d_matmul(x, kernel, stride, padding)
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )


def _conv2d_matmul(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    views = [
        lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                  (1, stride, stride, 1))
        for i in range(kh) for j in range(kw)
    ]  # row-major (i, j), channels inside: the order of kernel.reshape(kh * kw * cin, cout)
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())))


# --------------------------------------------------------------------------------------------------
# BatchNorm folded into the preceding convolution (inference only)
# --------------------------------------------------------------------------------------------------

_FOLDED_BN: contextvars.ContextVar[bool] = contextvars.ContextVar("zkd_folded_bn", default=False)


@contextlib.contextmanager
def folded_batchnorm(enabled: bool = True):
    """Within the block, :class:`BatchNorm` in eval mode computes ``y = x + bias`` (in float32,
    cast to its ``dtype``, as the unfolded form computes): the form of variables whose BatchNorms were folded into the convolutions before
    them (``zkd_jax.models.fold.fold_batchnorm``: the scale is in the conv kernel, the shift in
    ``bias``). Read when a model is traced, like :func:`conv_implementation`; train mode is
    unaffected."""
    token = _FOLDED_BN.set(bool(enabled))
    try:
        yield
    finally:
        _FOLDED_BN.reset(token)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` on NHWC inputs: symmetric zero padding, groups, optional bias.

    ``x [B, H, W, Cin] -> [B, H', W', features]`` with ``H' = (H + 2 p - k) // s + 1``.
    ``bias_init=None`` means PyTorch's default (uniform ``+-1/sqrt(fan_in)``).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = False
    kernel_init: Initializer = he_normal_fan_out
    bias_init: Initializer | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"Conv2d {self.name}: channels in={in_features}, out={self.features} are not "
                f"divisible by groups={self.groups}; fix the architecture definition."
            )
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (k, k, in_features // self.groups, self.features),
            jnp.float32,
        )
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
                   padding=self.padding, groups=self.groups)
        if self.use_bias:
            fan_in = in_features // self.groups * k * k
            bias_init = self.bias_init or torch_default_bias(fan_in)
            bias = self.param("bias", bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Linear(nn.Module):
    """``torch.nn.Linear``: ``x [..., in] -> x @ kernel + bias  [..., features]``.

    ``bias_init=None`` means PyTorch's default (uniform ``+-1/sqrt(in)``).
    """

    features: int
    kernel_init: Initializer = torch_default_kernel
    bias_init: Initializer | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        bias_init = self.bias_init or torch_default_bias(in_features)
        bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` semantics over the last (channel) axis.

    ``y = (x - mu) / sqrt(v + eps) * scale + bias`` with, in train mode, ``mu``/``v`` the batch mean
    and *biased* variance over all axes but the last (``n = B * H * W`` values per channel), and the
    running statistics (collection ``batch_stats``: ``mean``, ``var``) updated as
    ``mean <- (1 - m) mean + m mu``, ``var <- (1 - m) var + m v n / (n - 1)`` (the *unbiased*
    variance, as PyTorch does; Flax's own BatchNorm uses the biased one). In eval mode the running
    statistics are used. Statistics and normalization are computed in float32 whatever ``dtype``;
    the output is cast to ``dtype``. Under ``jax.jit`` with a batch sharded across devices the means
    are over the global batch (plain global-array semantics; no ``axis_name``).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not train and _FOLDED_BN.get():  # folded: the conv before holds the scale
            return (x.astype(jnp.float32) + bias).astype(self.dtype)
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(
                    f"BatchNorm {self.name}: train mode needs more than one value per channel "
                    f"(got input shape {x.shape}); use a larger batch or train=False."
                )
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / (n - 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = (xf - mean) * mul + bias
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------------
# Parameter-free operations
# --------------------------------------------------------------------------------------------------


def max_pool(x: Array, kernel: int, stride: int, padding: int = 0) -> Array:
    """``nn.MaxPool2d(kernel, stride, padding)``: padding counts as ``-inf``; floor output size."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding=pad)


def avg_pool(x: Array, kernel: int, stride: int, padding: int = 0) -> Array:
    """``nn.AvgPool2d(kernel, stride, padding)``, PyTorch's default ``count_include_pad=True``."""
    pad = ((padding, padding), (padding, padding))
    return nn.avg_pool(
        x, (kernel, kernel), strides=(stride, stride), padding=pad, count_include_pad=True
    )


def global_avg_pool(x: Array) -> Array:
    """Mean over the spatial axes, in float32: ``[B, H, W, C] -> [B, C]``."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def channel_shuffle(x: Array, groups: int) -> Array:
    """ShuffleNet's channel shuffle, NHWC: channel ``i * (C / g) + j`` moves to ``j * g + i``."""
    b, h, w, c = x.shape
    if groups == 1:
        return x
    return x.reshape(b, h, w, groups, c // groups).swapaxes(3, 4).reshape(b, h, w, c)

"""BatchNorm folded into the convolution before it: a teacher's inference-only variables.

A teacher that runs in eval mode applies, after a convolution ``z = conv(x, W) [+ c]``, the fixed
affine map of its BatchNorm ``y = (z - mean) * gamma / sqrt(var + eps) + beta``. With
``s = gamma / sqrt(var + eps)`` (per output channel) the pair is one convolution with a bias:

    W' = W * s                      (the kernel's output axis scaled)
    b' = beta - mean * s  (+ c * s when the conv has its own bias c, which becomes 0)

so ``y = conv(x, W') + b'`` exactly in real arithmetic (float rounding differs). :func:`fold_batchnorm`
rewrites a variable tree that way, purely, and casts the folded kernels to the compute dtype
(weights held as the teacher computes, not converted on every call); the model then runs with
``zkd_jax.models.layers.folded_batchnorm()``, under which an eval-mode BatchNorm adds its ``bias``
only. The folded tree is for the step only: checkpoints and exports keep the unfolded variables.

Which pairs fold: :func:`conv_bn_pairs` traces the model once (abstractly, nothing runs) and pairs
every BatchNorm whose input is the output of the convolution called just before it. A family
folds when every BatchNorm is so paired and those convolutions feed nothing else
(:data:`FOLDABLE`: the post-activation CNNs, ResNets, VGG, MobileNets, ShuffleNets); WideResNet is
pre-activation (its BatchNorms follow sums, and its stem conv also feeds a residual), so it stays
unfolded, as do the ViTs (no BatchNorm after a conv).

>>> from zkd_jax import models
>>> net = models.create("resnet8", num_classes=10)
>>> variables = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
>>> folded = fold_batchnorm(net, variables)
>>> with folded_batchnorm():
...     logits = net.apply(folded, jnp.ones((2, 32, 32, 3)), train=False)  # == unfolded, ~1e-6
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.layers import BatchNorm, Conv2d, folded_batchnorm

__all__ = ["FOLDABLE", "can_fold", "conv_bn_pairs", "fold_batchnorm", "folded_batchnorm"]

#: Module classes (by name) whose every BatchNorm directly follows a convolution that feeds it
#: alone; :func:`fold_batchnorm` folds these and leaves every other model as it is.
FOLDABLE = ("ResNetCifar", "ResNet", "VGG", "MobileNetV1", "MobileNetV2", "ShuffleNetV1",
            "ShuffleNetV2")

Path = tuple[str, ...]


def conv_bn_pairs(model: nn.Module, image_hw: tuple[int, int] = (32, 32)
                  ) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(pairs, unpaired)``: (conv path, BatchNorm path) for every BatchNorm whose input is the
    output of the :class:`Conv2d` called just before it, and the paths of the other BatchNorms.

    Paths are module paths inside ``params`` (``("layer1_0", "conv1")``). Traced with
    ``jax.eval_shape`` on a ``[1, *image_hw, 3]`` input; nothing is computed.
    """
    pairs: list[tuple[Path, Path]] = []
    unpaired: list[Path] = []
    last: dict[str, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        if isinstance(module, Conv2d):
            last["out"], last["path"] = out, tuple(module.path)
        elif isinstance(module, BatchNorm):
            x = args[0] if args else kwargs.get("x")
            if last.get("out") is not None and x is last["out"]:
                pairs.append((last["path"], tuple(module.path)))
            else:
                unpaired.append(tuple(module.path))
            last.clear()
        return out

    def init(key, x):
        with nn.intercept_methods(interceptor):
            return model.init(key, x, train=False)

    jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32))
    return pairs, unpaired


def can_fold(model: nn.Module) -> bool:
    """True when ``model`` is of a :data:`FOLDABLE` family (and has BatchNorms)."""
    return type(model).__name__ in FOLDABLE


def _get(tree: Mapping, path: Path) -> Mapping:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree[name]
    tree[path[-1]] = value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def fold_batchnorm(model: nn.Module, variables: Mapping[str, Any], *, dtype: Any = None,
                   image_hw: tuple[int, int] = (32, 32)) -> dict[str, Any]:
    """The eval-mode variables of ``model`` with every Conv -> BatchNorm pair folded (module
    docstring: ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``).

    Pure: returns a new tree (same structure and shapes; the folded conv kernels in ``dtype``,
    default the model's compute dtype; ``b'`` in the BatchNorm's ``bias``, float32; ``scale``,
    ``mean`` and ``var`` kept but unused). Apply the result with ``folded_batchnorm()`` in eval
    mode only. A model that is not :data:`FOLDABLE`, or whose trace finds a BatchNorm that does
    not follow a conv, is returned unchanged (a copy); check with :func:`can_fold` first if the
    caller must know. Works on concrete arrays and inside ``jax.eval_shape``/``jit``.
    """
    out = _copy(dict(variables))
    if not can_fold(model):
        return out
    pairs, unpaired = conv_bn_pairs(model, image_hw)
    if unpaired or not pairs:
        return out
    dtype = dtype or getattr(model, "dtype", jnp.float32)
    params, stats = out["params"], out["batch_stats"]
    for conv_path, bn_path in pairs:
        conv, bn = _get(params, conv_path), _get(params, bn_path)
        running = _get(stats, bn_path)
        eps = jnp.float32(BatchNorm.epsilon)  # every model of the zoo: the default, 1e-5
        s = bn["scale"] * jax.lax.rsqrt(running["var"] + eps)  # [out], float32
        shift = bn["bias"] - running["mean"] * s
        conv = dict(conv)
        if "bias" in conv:
            shift = shift + conv["bias"] * s
            conv["bias"] = jnp.zeros_like(conv["bias"])
        conv["kernel"] = (conv["kernel"] * s).astype(dtype)
        _set(params, conv_path, conv)
        _set(params, bn_path, {**bn, "bias": shift})
    return out


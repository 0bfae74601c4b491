"""The model zoo of the paper's reference code as Flax linen modules, and its registry.

>>> import jax, jax.numpy as jnp
>>> model = create("resnet8", num_classes=100)  # CIFAR by default
>>> images = jnp.zeros((2, 32, 32, 3))
>>> variables = model.init(jax.random.key(0), images, train=False)
>>> model.apply(variables, images, train=False).shape  # float32 logits
(2, 100)
>>> logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
>>> sorted(updates)
['batch_stats']

Every module takes NHWC float images and returns float32 logits ``[B, num_classes]``; parameters are
float32 (collection ``params``), ``dtype`` is the compute dtype; BatchNorm running statistics live
in ``batch_stats`` (PyTorch semantics, see :class:`zkd_jax.models.layers.BatchNorm`). The global
pooling and the classifier always run in float32. Parameter names mirror the reference's PyTorch
``state_dict`` (``layer1.0.conv1.weight`` <-> ``params/layer1_0/conv1/kernel``), which is what
:mod:`zkd_jax.io.torch_weights` relies on.

This package imports JAX and Flax only (no TensorFlow).
"""

from __future__ import annotations

import functools
import operator
from typing import Any
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from zkd_jax.models.deit import DeiT
from zkd_jax.models.mobilenet import MobileNetV1, MobileNetV2
from zkd_jax.models.pit import PiT
from zkd_jax.models.pvt import PVT
from zkd_jax.models.resnet import ResNet
from zkd_jax.models.resnet_cifar import ResNetCifar
from zkd_jax.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from zkd_jax.models.t2t import T2TViT
from zkd_jax.models.variables import check_variables, count_params, flatten
from zkd_jax.models.vgg import VGG, VGG_CONFIGS
from zkd_jax.models.wrn import WideResNet

__all__ = [
    "DATASETS",
    "abstract_variables",
    "check_variables",
    "count_params",
    "create",
    "default_num_classes",
    "flatten",
    "image_shape",
    "names",
]

_P = functools.partial
_CIFAR_FILTERS = (16, 16, 32, 64)
_CIFAR_FILTERS_X4 = (32, 64, 128, 256)

_CIFAR: dict[str, Callable[..., nn.Module]] = {
    "resnet8": _P(ResNetCifar, depth=8, num_filters=_CIFAR_FILTERS),
    "resnet14": _P(ResNetCifar, depth=14, num_filters=_CIFAR_FILTERS),
    "resnet20": _P(ResNetCifar, depth=20, num_filters=_CIFAR_FILTERS),
    "resnet32": _P(ResNetCifar, depth=32, num_filters=_CIFAR_FILTERS),
    "resnet44": _P(ResNetCifar, depth=44, num_filters=_CIFAR_FILTERS),
    "resnet56": _P(ResNetCifar, depth=56, num_filters=_CIFAR_FILTERS),
    "resnet110": _P(ResNetCifar, depth=110, num_filters=_CIFAR_FILTERS),
    "resnet8x4": _P(ResNetCifar, depth=8, num_filters=_CIFAR_FILTERS_X4),
    "resnet32x4": _P(ResNetCifar, depth=32, num_filters=_CIFAR_FILTERS_X4),
    "ResNet18": _P(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False, variant="cifar"),
    "ResNet50": _P(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True, variant="cifar"),
    "wrn_16_1": _P(WideResNet, depth=16, widen_factor=1),
    "wrn_16_2": _P(WideResNet, depth=16, widen_factor=2),
    "wrn_40_1": _P(WideResNet, depth=40, widen_factor=1),
    "wrn_40_2": _P(WideResNet, depth=40, widen_factor=2),
    **{name: _P(VGG, cfg=cfg) for name, cfg in VGG_CONFIGS.items()},
    "MobileNetV2": _P(MobileNetV2, expansion=6, width_mult=0.5),
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
}

_IMAGENET: dict[str, Callable[..., nn.Module]] = {
    "ResNet18": _P(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False, variant="imagenet"),
    "ResNet34": _P(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False, variant="imagenet"),
    "ResNet50": _P(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True, variant="imagenet"),
    "MobileNetV1": MobileNetV1,
}

#: The ViT students of the paper's third experiment: CIFAR upsampled to 224 px. Their
#: teacher is the 32-px ``cifar100`` ``resnet56``. DeiT returns its class head in train mode and
#: the mean of both heads in eval mode; ``return_heads=True`` gives ``{"cls", "dist"}``.
_VIT_224: dict[str, Callable[..., nn.Module]] = {
    "deit_ti": DeiT,
    "t2t_vit_7": T2TViT,
    "pit_ti": PiT,
    "pvt_ti": PVT,
}

#: dataset -> (registry, image shape HWC, default number of classes). ``cifar10`` shares the
#: CIFAR architectures.
DATASETS: dict[str, tuple[dict[str, Callable[..., nn.Module]], tuple[int, int, int], int]] = {
    "cifar100": (_CIFAR, (32, 32, 3), 100),
    "cifar10": (_CIFAR, (32, 32, 3), 10),
    "imagenet": (_IMAGENET, (224, 224, 3), 1000),
    "cifar100_224": (_VIT_224, (224, 224, 3), 100),
}


def _dataset_entry(dataset: str):
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; use one of {sorted(DATASETS)}.")
    return DATASETS[dataset]


def names(dataset: str = "cifar100") -> list[str]:
    """The architecture names available for ``dataset``, in the reference's order."""
    return list(_dataset_entry(dataset)[0])


def image_shape(dataset: str = "cifar100") -> tuple[int, int, int]:
    """The ``(H, W, C)`` the reference feeds its models: 32x32 for CIFAR, 224x224 for ImageNet and
    for the ViT students (``cifar100_224``)."""
    return _dataset_entry(dataset)[1]


def default_num_classes(dataset: str = "cifar100") -> int:
    """100 for CIFAR-100, 10 for CIFAR-10, 1000 for ImageNet."""
    return _dataset_entry(dataset)[2]


def create(
    name: str, *, num_classes: int, dataset: str = "cifar100", dtype: Any = jnp.float32
) -> nn.Module:
    """Build architecture ``name`` of ``dataset``'s family.

    Returns a linen module whose ``__call__(x, train)`` maps NHWC float images ``[B, H, W, 3]`` to
    float32 logits ``[B, num_classes]``. ``dtype`` is the compute dtype (parameters and BatchNorm
    statistics stay float32). Raises ``ValueError`` for an unknown name or dataset, listing the
    valid ones.
    """
    registry = _dataset_entry(dataset)[0]
    if name not in registry:
        raise ValueError(
            f"Unknown architecture {name!r} for dataset {dataset!r}; valid names: "
            f"{', '.join(registry)}."
        )
    try:
        n = operator.index(num_classes)  # int, or a NumPy integer from a config
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"num_classes must be a positive integer (got {num_classes!r}).")
    return registry[name](num_classes=n, dtype=dtype)


def abstract_variables(model: nn.Module, image_hw: tuple[int, int] = (32, 32)) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no compute).

    Parameter shapes do not depend on the image size of the globally pooled CNNs; ``image_hw``
    only has to be large enough for the architecture (32x32 suits all of them). The ViT students
    (``cifar100_224``) need their own size (224x224: position tables) and have a ``buffers``
    collection (T2T's fixed tensors).
    """
    x = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    order: list[str] = []

    def init(k, x):
        variables = model.init(k, x, train=False)
        order.extend(flatten(variables))  # creation order; eval_shape's output has sorted keys
        return variables

    shapes = flatten(jax.eval_shape(init, jax.random.key(0), x))
    # Rebuild in creation order (the layers' order), so that messages list keys as the model runs.
    out: dict[str, Any] = {}
    for path in order:
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = shapes[path]
    return out

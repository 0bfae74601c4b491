"""BatchNorm folded into the convolutions (zkd_jax.models.fold): the teacher's logits unchanged.

For one model of every foldable family, random BatchNorm statistics and affine parameters (so the
fold is not the identity), float32: the folded variables under ``folded_batchnorm()`` give the
unfolded eval-mode logits to 1e-5; the fold is pure (its input is untouched) and the folded kernels
are in the compute dtype; WideResNet (pre-activation) is left unfolded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import models
from zkd_jax.models import fold

FAMILIES = [  # (arch, dataset, image side): one per foldable family, tiny inputs
    ("resnet8", "cifar100", 16),
    ("ResNet18", "cifar100", 8),
    ("vgg8", "cifar100", 32),
    ("MobileNetV2", "cifar100", 16),
    ("ShuffleV1", "cifar100", 16),
    ("ShuffleV2", "cifar100", 16),
    ("ResNet18", "imagenet", 32),
    ("MobileNetV1", "imagenet", 32),
]


def _randomized(variables, seed):
    """Random running statistics and BatchNorm affine parameters (every 1-D params leaf)."""
    leaves, treedef = jax.tree.flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        name = str(path[-1].key)
        if name == "var":
            x = rng.uniform(0.5, 2.0, x.shape)
        elif name in ("mean", "bias"):
            x = rng.normal(0.0, 0.3, x.shape)
        elif name == "scale":
            x = rng.uniform(0.5, 1.5, x.shape)
        out.append(jnp.asarray(x, jnp.float32))
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("arch, dataset, side", FAMILIES)
def test_folded_teacher_gives_the_unfolded_logits(arch, dataset, side):
    net = models.create(arch, num_classes=10, dataset=dataset)
    assert fold.can_fold(net)
    x = jax.random.normal(jax.random.key(1), (2, side, side, 3))
    variables = _randomized(net.init(jax.random.key(0), x, train=False), seed=2)
    before = jax.tree.map(np.asarray, variables)
    folded = fold.fold_batchnorm(net, variables, image_hw=(side, side))
    want = net.apply(variables, x, train=False)
    with fold.folded_batchnorm():
        got = net.apply(folded, x, train=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(want))) > 1e-2  # not a vacuous comparison
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))


def test_kernels_held_in_the_compute_dtype_and_wrn_left_unfolded():
    net = models.create("resnet8", num_classes=10, dtype=jnp.bfloat16)
    abstract = models.abstract_variables(net)
    folded = jax.eval_shape(lambda v: fold.fold_batchnorm(net, v), abstract)
    assert folded["params"]["layer1_0"]["conv1"]["kernel"].dtype == jnp.bfloat16
    assert folded["params"]["layer1_0"]["bn1"]["bias"].dtype == jnp.float32
    assert folded["params"]["fc"]["kernel"].dtype == jnp.float32  # the classifier is not a conv
    wrn = models.create("wrn_16_1", num_classes=10)
    assert not fold.can_fold(wrn)
    pairs, unpaired = fold.conv_bn_pairs(wrn)
    assert pairs and unpaired  # BatchNorms after sums: no fold
    variables = models.abstract_variables(wrn)
    same = jax.eval_shape(lambda v: fold.fold_batchnorm(wrn, v), variables)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), same) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables)

"""``zkd_jax.models.layers.conv2d``: XLA's convolution and its matrix-product form agree.

The "matmul" form (patches times the reshaped kernel) must be the same sum as
``lax.conv_general_dilated`` for every kernel size, stride and padding the zoo uses, in value and
gradient, in float32 and bfloat16; under ``jax.vmap`` over kernels it must trace batched matrix
products, not grouped convolutions (what ``multi_student``'s "vmap_matmul" form relies on); and
whole zoo models give the same logits either way.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax.models import layers

CASES = [  # (kernel, stride, padding): 3x3 same, 3x3 downsample, 1x1 shortcut, 5x5, valid 3x3
    (3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0), (5, 1, 2), (3, 2, 0),
]


def _inputs(k: int, seed: int = 0, h: int = 9):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (2, h, h + 1, 4)), jax.random.normal(kw, (k, k, 4, 6)) * 0.3


class ConvImplTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matmul_equals_xla_convolution(self):
        for k, s, p in CASES:
            x, w = _inputs(k)
            conv = self.variant(lambda x, w, impl, k=k, s=s, p=p: layers.conv2d(  # noqa: B023
                x, w, stride=s, padding=p, impl=impl), static_argnums=2)
            want, got = conv(x, w, "xla"), conv(x, w, "matmul")
            chex.assert_equal_shape([want, got])
            chex.assert_shape(got, (2, (9 + 2 * p - k) // s + 1, (10 + 2 * p - k) // s + 1, 6))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{k, s, p}")

    def test_gradients_agree(self):
        for k, s, p in CASES[:3] + CASES[-1:]:  # the zoo's 3x3 / stride-2 / 1x1 cases, valid
            x, w = _inputs(k, seed=1)
            cot = jax.random.normal(jax.random.PRNGKey(2), layers.conv2d(x, w, stride=s,
                                                                         padding=p).shape)

            def f(x, w, impl, s=s, p=p, cot=cot):
                return jnp.sum(layers.conv2d(x, w, stride=s, padding=p, impl=impl) * cot)

            grad = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)
            want, got = grad(x, w, "xla"), grad(x, w, "matmul")
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{k, s, p}")

    def test_bfloat16_stays_bfloat16_and_close(self):
        x, w = _inputs(3)
        x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        got = layers.conv2d(x16, w16, stride=1, padding=1, impl="matmul")
        chex.assert_type(got, jnp.bfloat16)
        want = layers.conv2d(x16.astype(jnp.float32), w16.astype(jnp.float32), stride=1, padding=1)
        np.testing.assert_allclose(np.float32(got), want, rtol=3e-2, atol=3e-2)


def test_context_switches_conv2d_module_and_vmap_traces_batched_matmuls():
    module = layers.Conv2d(6, 3, stride=2, padding=1, use_bias=True)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 2, 8, 8, 4))  # students' own activations
    variables = [module.init(jax.random.PRNGKey(i), x[0]) for i in range(3)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *variables)

    def apply_all(v, impl):  # the context inside the traced function, as multi_student does
        with layers.conv_implementation(impl):
            return jax.vmap(module.apply)(v, x)

    plain = str(jax.make_jaxpr(apply_all, static_argnums=1)(stacked, "xla"))
    fused = str(jax.make_jaxpr(apply_all, static_argnums=1)(stacked, "matmul"))
    out = apply_all(stacked, "matmul")
    assert "conv_general_dilated" in plain and "feature_group_count=3" in plain
    assert "conv_general_dilated" not in fused and "dot_general" in fused
    np.testing.assert_allclose(out, apply_all(stacked, "xla"), rtol=1e-5, atol=1e-5)
    assert layers._CONV_IMPL.get() == "xla"  # pylint: disable=protected-access  # reset on exit


def test_grouped_convolutions_keep_xla_under_matmul():
    module = layers.Conv2d(8, 3, padding=1, groups=4)
    x = jnp.ones((1, 5, 5, 8))
    v = module.init(jax.random.PRNGKey(0), x)
    with layers.conv_implementation("matmul"):
        jaxpr = str(jax.make_jaxpr(module.apply)(v, x))
    assert "feature_group_count=4" in jaxpr


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="not one of xla, matmul"):
        with layers.conv_implementation("cudnn"):
            pass


@pytest.mark.parametrize("arch, dataset, size", [
    ("resnet8x4", "cifar100", 32),   # 3x3 stride 1/2, 1x1 stride-2 shortcuts
    ("vgg8", "cifar100", 32),        # biased convs
    ("ShuffleV1", "cifar100", 32),   # grouped and depthwise convs: XLA kept
    ("ResNet18", "imagenet", 64),    # 7x7 stride-2 stem with padding 3
])
def test_zoo_models_give_the_same_logits_with_matmul_convolutions(arch, dataset, size):
    from zkd_jax import models
    from zkd_jax.step.state import init_variables

    model = models.create(arch, num_classes=10, dataset=dataset)
    variables = init_variables(model, jax.random.PRNGKey(0), (1, size, size, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))

    @functools.partial(jax.jit, static_argnums=0)
    def logits(impl, variables, x):
        with layers.conv_implementation(impl):
            return model.apply(variables, x, train=False)

    want, got = logits("xla", variables, x), logits("matmul", variables, x)
    chex.assert_shape(got, (2, 10))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

"""The per-row ``tau^2 KL`` primitive and its temperature derivative (zkd_jax.tempered_kl)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from zkd_jax import tempered_kl


def _plain_rows(a, b, tau):
    """The textbook formula, differentiated by plain autodiff."""
    log_pt = jax.nn.log_softmax(a / tau, axis=-1)
    log_ps = jax.nn.log_softmax(b / tau, axis=-1)
    return tau**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def _zscore(x):
    x = x - x.mean(-1, keepdims=True)
    return x / x.std(-1, ddof=1, keepdims=True)


def _rows(seed, shape, scale=1.0, standardized=True):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape) * rng.uniform(0.5, 5.0, shape[:-1] + (1,))
    a += 8.0 * np.eye(shape[-1])[rng.integers(0, shape[-1], shape[:-1])]
    b = rng.normal(size=shape)
    if standardized:
        a, b = _zscore(a), _zscore(b)
    return scale * a, scale * b


@pytest.mark.parametrize("tau", [0.25, 1.0, 4.0, 12.5, 20.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_both_forms_of_the_temperature_derivative_agree_in_float64(classes, tau):
    """Path form (quadrature) == direct form == autodiff, wherever the path form is selected."""
    with jax.enable_x64():
        a, b = (jnp.asarray(x) for x in _rows(classes, (32, classes)))
        tau = jnp.float64(tau)
        reference = jax.vmap(jax.grad(_plain_rows, argnums=2), (0, 0, None))(a, b, tau)
        path = tempered_kl._dh_dtau_path(a, b, tau)
        chosen = tempered_kl.dh_dtau(a, b, tau)
        np.testing.assert_allclose(chosen, reference, rtol=1e-7, atol=1e-12)
        kappa = ((a - b).max(-1) - (a - b).min(-1)) / tau
        quad_rows = kappa <= tempered_kl.QUAD_MAX_KAPPA
        np.testing.assert_allclose(path[quad_rows], reference[quad_rows], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kappa", [0.5, 3.0, tempered_kl.QUAD_MAX_KAPPA])
def test_quadrature_is_exact_up_to_the_largest_spread_it_serves(kappa):
    """Two classes pulled apart in opposite directions: the hardest integrand at a given kappa."""
    with jax.enable_x64():
        tau = jnp.float64(2.0)
        r = jnp.linspace(-1.0, 1.0, 11)[:, None]
        u = (kappa * tau + 2 * r) / 4  # so that d = a - b = [2u - r, r - 2u] spans kappa * tau
        a = jnp.concatenate([u, -u], -1)
        b = jnp.concatenate([r - u, u - r], -1)
        reference = jax.vmap(jax.grad(_plain_rows, argnums=2), (0, 0, None))(a, b, tau)
        path = tempered_kl._dh_dtau_path(a, b, tau)
        spread = (a - b).max(-1) - (a - b).min(-1)
        assert float(spread.max()) <= kappa * float(tau) * (1 + 1e-12)
        np.testing.assert_allclose(path, reference, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("tau", [4.0, 12.5, 20.0])
@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_float32_temperature_gradient_keeps_its_digits(classes, tau):
    """On standardized logits dL/dtau is thousands of times smaller than its terms; float32 still
    matches float64 (same float32 inputs) to 1e-5, where plain float32 autodiff does not."""
    a, b = (jnp.asarray(x, jnp.float32) for x in _rows(classes + 1, (64, classes)))

    def loss(fn, tau):
        return jnp.mean(fn(a.astype(tau.dtype), b.astype(tau.dtype), tau))

    ours = jax.grad(lambda t: loss(tempered_kl.tau2_kl_rows, t))(jnp.float32(tau))
    with jax.enable_x64():
        exact = jax.grad(lambda t: loss(_plain_rows, t))(jnp.float64(tau))
    assert abs(float(ours) - float(exact)) <= 1e-5 * abs(float(exact))


def test_value_and_logit_derivatives_are_the_textbook_ones():
    with jax.enable_x64():
        a, b = (jnp.asarray(x) for x in _rows(0, (6, 7), standardized=False))
        tau = jnp.float64(3.0)
        np.testing.assert_allclose(
            tempered_kl.tau2_kl_rows(a, b, tau), _plain_rows(a, b, tau), rtol=1e-12
        )
        for argnum in (0, 1, 2):
            ours = jax.jit(jax.jacfwd(tempered_kl.tau2_kl_rows, argnums=argnum))(a, b, tau)
            plain = jax.jit(jax.jacfwd(_plain_rows, argnums=argnum))(a, b, tau)
            np.testing.assert_allclose(ours, plain, rtol=1e-9, atol=1e-14)
        check_grads(tempered_kl.tau2_kl_rows, (a, b, tau), order=1, modes=("fwd", "rev"))


def test_second_derivatives_are_the_textbook_ones():
    """The custom rule is itself differentiable (Hessian-vector products, meta-learning)."""
    with jax.enable_x64():
        a, b = (jnp.asarray(x) for x in _rows(1, (3, 5), standardized=False))

        def total(fn):
            return lambda b, tau: jnp.sum(fn(a, b, tau))

        for argnum in (0, 1):
            ours = jax.jit(jax.hessian(total(tempered_kl.tau2_kl_rows), argnums=argnum))(b, 3.0)
            plain = jax.jit(jax.hessian(total(_plain_rows), argnums=argnum))(b, 3.0)
            np.testing.assert_allclose(ours, plain, rtol=1e-9, atol=1e-13)


class VariantTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_vmap_and_grad_agree(self):
        a, b = (jnp.asarray(x, jnp.float32) for x in _rows(3, (3, 5, 11)))

        def loss(b, tau):
            return jnp.mean(tempered_kl.tau2_kl_rows(a, b, tau))

        grad = self.variant(jax.grad(loss, argnums=(0, 1)))(b, jnp.float32(12.5))
        sliced = jax.vmap(
            jax.grad(lambda a_, b_, t: jnp.mean(tempered_kl.tau2_kl_rows(a_, b_, t)), (1, 2)),
            (0, 0, None),
        )(a, b, jnp.float32(12.5))
        chex.assert_trees_all_close(grad[0], sliced[0] / 3.0, rtol=1e-5)
        chex.assert_trees_all_close(grad[1], jnp.mean(sliced[1]), rtol=1e-5)
        chex.assert_shape(grad[0], b.shape)


def test_fixed_temperature_costs_no_quadrature():
    """The temperature derivative is only built when the temperature is differentiated."""
    a, b = (jnp.asarray(x, jnp.float32) for x in _rows(4, (4, 10)))

    def loss(b, tau):
        return jnp.mean(tempered_kl.tau2_kl_rows(a, b, tau))

    student_only = str(jax.make_jaxpr(jax.grad(loss))(b, jnp.float32(4.0)))
    with_temperature = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(b, jnp.float32(4.0)))
    assert "scan" not in student_only
    assert "scan" in with_temperature


def test_extreme_and_constant_rows_stay_finite():
    a = jnp.asarray([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
    b = jnp.asarray([[-1e4, 1e4, 0.0], [1.0, 2.0, 3.0]], jnp.float32)
    value, grads = jax.value_and_grad(
        lambda b, t: jnp.sum(tempered_kl.tau2_kl_rows(a, b, t)), argnums=(0, 1)
    )(b, jnp.float32(2.0))
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)

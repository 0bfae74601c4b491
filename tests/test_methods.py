"""The methods' objectives: composition of the losses, DKD warm-up, CTKD's learned temperature."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import losses, methods
from zkd_jax.configs import common

B, C = 6, 7


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    s = {v: jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32) for v in ("weak", "strong")}
    t = {v: jnp.asarray(rng.normal(size=(B, C)) * 3, jnp.float32) for v in ("weak", "strong")}
    labels = jnp.asarray(rng.integers(0, C, B), jnp.int32)
    return s, t, labels


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_z(x):
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)


def test_kd_objective_in_numpy(logits):
    s, t, labels = logits
    method = methods.KD(temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True)
    loss, terms = method.objective({}, s, t, labels, jnp.int32(1))
    s64, t64 = np.asarray(s["weak"], np.float64), np.asarray(t["weak"], np.float64)
    ce = -_np_log_softmax(s64)[np.arange(B), np.asarray(labels)].mean()
    lp_t, lp_s = _np_log_softmax(_np_z(t64) / 2), _np_log_softmax(_np_z(s64) / 2)
    kd = 4 * (np.exp(lp_t) * (lp_t - lp_s)).sum(-1).mean()
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.1 * ce + 9 * kd, rtol=1e-5)
    chex.assert_type([loss, *terms.values()], jnp.float32)
    chex.assert_shape([loss, *terms.values()], ())


@pytest.mark.parametrize("epoch,factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (200, 1.0)])
def test_dkd_warmup_by_epoch_without_recompiling(logits, epoch, factor):
    s, t, labels = logits
    method = methods.DKD(temperature=4.0, ce_weight=1.0, alpha=1.0, beta=8.0, warmup_epochs=20)
    traces = []

    @jax.jit
    def objective(e):
        traces.append(1)
        return method.objective({}, s, t, labels, e)

    loss, terms = objective(jnp.int32(epoch))
    objective(jnp.int32(epoch + 1))
    assert len(traces) == 1  # the epoch is a traced value
    dkd = losses.dkd_loss(s["weak"], t["weak"], labels, alpha=1.0, beta=8.0, temperature=4.0)
    ce = losses.cross_entropy(s["weak"], labels)
    np.testing.assert_allclose(terms["warmup"], factor, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + factor * dkd, rtol=1e-5)


def test_ctkd_temperature_is_learned_through_gradient_reversal(logits):
    s, t, labels = logits
    method = methods.CTKD(temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True)
    params = method.init_params()
    assert float(params["global_t"]) == 1.0  # initialised to 1 in training
    epoch = 4
    lam = -1 + (math.cos(math.pi * epoch / 10) + 1) / 2  # cosine curriculum, lmax 0, lmin -1

    def loss_of(g):
        return method.objective({"global_t": g}, s, t, labels, jnp.int32(epoch))[0]

    _, terms = method.objective(params, s, t, labels, jnp.int32(epoch))
    expected_t = 1 + 20 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(terms["temperature"], expected_t, rtol=1e-6)
    np.testing.assert_allclose(terms["lambda"], lam, rtol=1e-6)
    # d loss / d g through the reversal = lambda * (the derivative without reversal).
    def plain_loss(g):
        temp = 1 + 20 * jax.nn.sigmoid(g)
        kd = losses.kd_loss(s["weak"], t["weak"], temp, standardize=True)
        return 0.1 * losses.cross_entropy(s["weak"], labels) + 9 * kd

    plain = jax.grad(plain_loss)(jnp.float32(1.0))
    grad = jax.grad(loss_of)(jnp.float32(1.0))
    np.testing.assert_allclose(grad, lam * plain, rtol=1e-5)
    np.testing.assert_allclose(loss_of(jnp.float32(1.0)), plain_loss(jnp.float32(1.0)), rtol=1e-6)
    assert lam < 0 and np.sign(grad) == -np.sign(plain)  # the temperature ascends the KD loss


def test_ctkd_fixed_temperature(logits):
    s, t, labels = logits
    method = methods.CTKD(temperature=4.0, learn=False)
    assert method.init_params() == {}
    loss, terms = method.objective({}, s, t, labels, jnp.int32(3))
    expected = 0.1 * losses.cross_entropy(s["weak"], labels) + 0.9 * losses.kd_loss(
        s["weak"], t["weak"], 4.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(terms["temperature"]) == 4.0


def test_mlkd_uses_both_views(logits):
    s, t, labels = logits
    method = methods.MLKD(temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True)
    assert method.views == ("weak", "strong")
    loss, terms = method.objective({}, s, t, labels, jnp.int32(1))
    ref = losses.mlkd_loss(s["weak"], s["strong"], t["weak"], t["strong"], labels,
                           temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True)
    np.testing.assert_allclose(loss, ref["total"], rtol=1e-6)
    assert set(terms) == {"ce", "kd", "cc", "bc"}


def test_cross_entropy_needs_no_teacher(logits):
    s, _, labels = logits
    method = methods.CrossEntropy()
    assert not method.needs_teacher
    loss, terms = method.objective({}, s, None, labels, jnp.int32(1))
    np.testing.assert_allclose(loss, losses.cross_entropy(s["weak"], labels), rtol=1e-6)


@pytest.mark.parametrize("variant", common.METHODS + (common.TEACHER,))
def test_every_method_variant_builds_from_its_defaults(variant):
    settings, _ = common.method_settings(variant, "resnet32x4", "resnet8x4")
    method = methods.from_config(common.method_config(settings))
    assert method.needs_teacher == (variant != common.TEACHER)
    if variant.endswith("_ls"):
        assert method.standardize


@pytest.mark.parametrize("settings,match", [
    (dict(name="fitnet"), r"unknown method name 'fitnet'"),
    (dict(name="kd", alpha=1.0), r"method 'kd' has no setting alpha"),
])
def test_bad_method_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        methods.from_config(settings)

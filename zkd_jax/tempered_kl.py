"""``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` per row, with an accurate ``d/d tau``.

This is the primitive under :func:`zkd_jax.losses.kd_loss`. Its value and its derivatives in the
logits are the textbook ones; what it adds is the derivative in the temperature, which CTKD learns.

Why a custom derivative. Write ``h(tau) = tau^2 KL``, ``a`` the teacher and ``b`` the student
logits of one row, ``d = a - b``, ``E_t`` / ``Cov_t`` moments under ``p_t = softmax(a / tau)``::

    dh/dtau = 2 tau KL - Cov_t(a, d) / tau + sum_c (p_t - p_s)_c b_c            (direct form)

Each of the three terms is ``O(1 / tau)`` while their sum is ``O(1 / tau^2)``: for standardized
logits at CTKD's temperatures (``tau ~ 12``) the sum is ~7,000 times smaller than its terms, and
float32 autodiff (which evaluates exactly this sum) loses 2 to 4 of its 7 digits. The same
derivative has a form without cancellation. With ``c_v = b + v d`` and ``p_v = softmax(c_v / tau)``
(the path from the student's to the teacher's distribution),
``KL = tau^-2 int_0^1 v Var_{p_v}(d) dv``, hence::

    dh/dtau = -tau^-2 int_0^1 v E_{p_v}[(d - E d)^2 (c_v - E c_v)] dv          (path form)

The integrand is analytic in ``v``; ``QUAD_NODES``-point Gauss-Legendre quadrature is exact to
float64 round-off while the spread of the logit difference over the temperature,
``kappa = (max d - min d) / tau``, is at most ``QUAD_MAX_KAPPA`` (the integrand's singularities,
zeros of the partition function of ``p_v``, lie at least ``pi / kappa`` off the real axis). Rows with ``kappa <= QUAD_MAX_KAPPA`` use the path form, the others (where the
cancellation is mild) the direct form. Both are the exact derivative; only the rounding differs.

Cost: the temperature derivative is built only when the temperature is differentiated (symbolic
zero tangents otherwise); then it costs about ``QUAD_NODES`` softmax passes over the logits, in a
``lax.scan`` (memory of one pass), next to the one pass of the value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = jax.Array

QUAD_NODES = 16
QUAD_MAX_KAPPA = 5.0

_GL_X, _GL_W = np.polynomial.legendre.leggauss(QUAD_NODES)
_NODES = (_GL_X + 1.0) / 2.0  # on [0, 1]
_WEIGHTS = _GL_W / 2.0


def _log_probs(a: Array, b: Array, tau: Array) -> tuple[Array, Array]:
    return jax.nn.log_softmax(a / tau, axis=-1), jax.nn.log_softmax(b / tau, axis=-1)


def kl_terms(log_pt: Array, log_ps: Array) -> tuple[Array, Array]:
    """``p_t`` and the per-class terms ``p_t (log p_t - log p_s)`` (0 where ``p_t == 0``)."""
    p_t = jnp.exp(log_pt)
    return p_t, jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0)


@jax.custom_jvp
def tau2_kl_rows(teacher: Array, student: Array, tau: Array) -> Array:
    """``tau^2 * sum_c p_t (log p_t - log p_s)`` over the last axis; ``p = softmax(x / tau)``.

    Args:
      teacher: ``[..., C]`` logits (float32 or float64).
      student: ``[..., C]`` logits, same shape and dtype.
      tau: scalar temperature (may be traced and differentiated).

    Returns:
      ``[...]`` per-row values. Terms with ``p_t == 0`` count 0.
    """
    _, terms = kl_terms(*_log_probs(teacher, student, tau))
    return tau**2 * jnp.sum(terms, axis=-1)


def _dh_dtau_direct(a: Array, b: Array, tau: Array, p_t: Array, p_s: Array, kl: Array) -> Array:
    e_a = jnp.sum(p_t * a, axis=-1, keepdims=True)
    d = a - b
    e_d = jnp.sum(p_t * d, axis=-1, keepdims=True)
    cov = jnp.sum(p_t * (a - e_a) * (d - e_d), axis=-1)
    return 2.0 * tau * kl - cov / tau + jnp.sum((p_t - p_s) * b, axis=-1)


def _dh_dtau_path(a: Array, b: Array, tau: Array) -> Array:
    d = a - b
    nodes = jnp.asarray(_NODES, a.dtype)
    weights = jnp.asarray(_WEIGHTS, a.dtype)

    def add_node(total, node):
        v, w = node
        c = b + v * d
        p = jax.nn.softmax(c / tau, axis=-1)
        d_centered = d - jnp.sum(p * d, axis=-1, keepdims=True)
        c_centered = c - jnp.sum(p * c, axis=-1, keepdims=True)
        third = jnp.sum(p * d_centered * d_centered * c_centered, axis=-1)
        return total + (w * v) * third, None

    total, _ = jax.lax.scan(add_node, jnp.zeros(a.shape[:-1], a.dtype), (nodes, weights))
    return -total / tau**2


def dh_dtau(a: Array, b: Array, tau: Array) -> Array:
    """``d/d tau`` of :func:`tau2_kl_rows`, per row, choosing the accurate form (module doc)."""
    log_pt, log_ps = _log_probs(a, b, tau)
    p_t, terms = kl_terms(log_pt, log_ps)
    direct = _dh_dtau_direct(a, b, tau, p_t, jnp.exp(log_ps), jnp.sum(terms, axis=-1))
    d = a - b
    use_path = jnp.max(d, axis=-1) - jnp.min(d, axis=-1) <= QUAD_MAX_KAPPA * jnp.abs(tau)
    return jnp.where(use_path, _dh_dtau_path(a, b, tau), direct)


@functools.partial(tau2_kl_rows.defjvp, symbolic_zeros=True)
def _tau2_kl_rows_jvp(primals, tangents):
    a, b, tau = primals
    da, db, dtau = tangents
    log_pt, log_ps = _log_probs(a, b, tau)
    p_t, terms = kl_terms(log_pt, log_ps)
    kl = jnp.sum(terms, axis=-1)
    out = tau**2 * kl
    tangent = jnp.zeros_like(out)
    if not isinstance(db, SymbolicZero):
        tangent += tau * jnp.sum((jnp.exp(log_ps) - p_t) * db, axis=-1)
    if not isinstance(da, SymbolicZero):
        weights = jnp.where(p_t > 0, p_t * (log_pt - log_ps - kl[..., None]), 0.0)
        tangent += tau * jnp.sum(weights * da, axis=-1)
    if not isinstance(dtau, SymbolicZero):
        tangent += dh_dtau(a, b, tau) * dtau
    return out, tangent

"""Distillation losses on logits: KD, DKD, MLKD, CTKD, each with optional logit standardization.

Every function here is pure, jit/vmap/grad-safe (no Python control flow on values) and imports
nothing but JAX (and ``zkd_jax.tempered_kl``, KD's per-row primitive, and ``zkd_jax.loss_checks``,
which import only JAX and NumPy). Arguments are checked by ``zkd_jax.loss_checks``: shapes and
dtypes always (also while ``jit`` traces), values (temperature > 0, labels in ``[0, C)``) only
when concrete; under ``jit`` a traced bad value is not detected (see that module). Logits may carry any number of leading axes (``[batch, classes]`` for vision,
``[batch, seq, vocab]`` for language models) where stated; the class axis is the last one.
Inputs in bfloat16 or float16 are computed in float32 and the result is float32; float64 inputs
(with ``jax_enable_x64``) stay float64, which is how the tests compare against the reference.

The reference semantics are reproduced exactly, quirks included: the
unbiased standard deviation, ``1e-7`` added to the std, ``tau**2 * KL(teacher || student)``
averaged over the batch, DKD's ``-1000`` target mask, MLKD's scalar-times-mask reduction.
One deliberate difference: a row of identical logits (std 0) gives finite gradients, where the
reference gives NaN; every other value is unchanged.
The gradient of a traced KD temperature (CTKD) is the same derivative computed in a form without
cancellation, so it keeps float32 precision where plain autodiff loses most digits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zkd_jax import loss_checks as _checks
from zkd_jax.chunked_kd import (
    DEFAULT_CHUNK_BYTES,
    chunked_kd_sum,
    default_chunk_rows,
    kd_loss_from_hidden,
    row_weights,
    sharded_kd_loss,
)
from zkd_jax.tempered_kl import kl_terms, tau2_kl_rows

Array = jax.Array

__all__ = [
    "bc_loss",
    "cc_loss",
    "cross_entropy",
    "ctkd_lambda",
    "ctkd_temperature",
    "dkd_loss",
    "gradient_reversal",
    "kd_loss",
    "kd_loss_from_hidden",
    "mlkd_loss",
    "standardize",
]

# Temperatures of MLKD's multi-level prediction alignment; the first is the configured one.
MLKD_EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def _compute_dtype(x: Array) -> jnp.dtype:
    """float32 for half precisions and float32; float64 stays float64."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _as_float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x))


def _safe_sqrt(x: Array) -> Array:
    """sqrt with a zero (not infinite) derivative at 0, identical values elsewhere."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def standardize(logits: Array, *, eps: float = 1e-7, axis: int = -1) -> Array:
    """Z-score of logits along ``axis`` (the paper's logit standardization).

    ``Z(l) = (l - mean(l)) / (std(l) + eps)`` where ``std`` is the *unbiased* standard deviation
    (divide by ``C - 1``, PyTorch's ``Tensor.std``) and ``eps`` is added to the std.

    Args:
      logits: ``[..., C]`` array (any float dtype).
      eps: added to the standard deviation.
      axis: the class axis.

    Returns:
      Array of the same shape, float32 (float64 for float64 input). A constant row gives zeros with
      finite gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> standardize(jnp.array([[1.0, 2.0, 3.0]])).round(4)
      Array([[-1.,  0.,  1.]], dtype=float32)
    """
    x = _as_float(logits)
    n = x.shape[axis]
    centered = x - jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.sum(centered * centered, axis=axis, keepdims=True) / max(n - 1, 1)
    return centered / (_safe_sqrt(var) + eps)


def _maybe_standardize(logits: Array, enabled: bool) -> Array:
    return standardize(logits) if enabled else _as_float(logits)


def _kl_rows(log_p_teacher: Array, log_p_student: Array) -> Array:
    """``sum_c p_t (log p_t - log p_s)`` over the last axis; terms with ``p_t == 0`` are 0."""
    return jnp.sum(kl_terms(log_p_teacher, log_p_student)[1], axis=-1)


def _masked_mean(values: Array, where: Array | None) -> Array:
    """Mean of ``values`` over all entries, or over those where ``where`` is True (0 if none)."""
    if where is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(jnp.asarray(where, dtype=bool), values.shape)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask).astype(values.dtype)
    return total / jnp.maximum(count, 1.0)


def cross_entropy(logits: Array, labels: Array, *, where: Array | None = None) -> Array:
    """Mean cross-entropy ``-log softmax(logits)[label]`` over all leading axes.

    Args:
      logits: ``[..., C]``.
      labels: integer ``[...]``.
      where: optional boolean ``[...]``; masked rows do not count.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
      >>> round(float(cross_entropy(logits, jnp.array([0, 1]))), 4)
      0.3069
    """
    _checks.check_ce_args(logits, labels, where)
    log_p = jax.nn.log_softmax(_as_float(logits), axis=-1)
    nll = -jnp.take_along_axis(log_p, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)
    return _masked_mean(nll[..., 0], where)


def kd_loss(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array,
    *,
    standardize: bool = False,
    where: Array | None = None,
    chunk_size: int | None = None,
    row_axis: str | None = None,
    vocab_axis: str | None = None,
) -> Array:
    """Hinton's KD loss, optionally on standardized logits.

    ``L = tau^2 * mean_rows KL(softmax(t / tau) || softmax(s / tau))`` with ``t, s`` replaced by
    ``Z(t), Z(s)`` when ``standardize`` is set. ``stop_gradient`` applies to the teacher *logits*
    only, so a traced ``temperature`` (CTKD) receives its gradient through both softmaxes; that
    gradient is computed in a form without cancellation (:mod:`zkd_jax.tempered_kl`), so it keeps
    float32 precision where plain autodiff loses most digits (standardized logits, ``tau ~ 12``).

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``, same shape.
      temperature: scalar (Python float or traced array).
      standardize: apply logit standardization to both models' logits first.
      where: optional boolean mask over the leading axes ``[...]`` (padding tokens, padded batch
        rows): masked rows contribute nothing, the mean is over unmasked rows, all-False gives 0.
      chunk_size: rows per chunk of the bounded-memory form (:mod:`zkd_jax.chunked_kd`: forward
        and backward in chunks of rows, same values and gradients). None: automatic, one pass
        when the float32 logits fit ``DEFAULT_CHUNK_BYTES``, else chunks of that size. That form
        is a ``custom_vjp``: reverse-mode only (``jax.jvp`` of it is not defined).
      row_axis: name of the axis of the mesh in context (``jax.set_mesh(mesh)``) the rows (the
        first leading axis, and ``where``'s) are sharded over; None: not sharded.
      vocab_axis: name of the mesh axis the classes (last axis) are sharded over. Either axis
        runs the chunked form in a ``shard_map`` over the named axes (:mod:`zkd_jax.chunked_kd`,
        docs/lm_sharding.md): the same value and gradients, no logits gathered.

    Returns:
      Scalar loss (float32; float64 for float64 inputs).

    Example:
      The standardized loss is the same for logits of any scale (here x100); ``where`` drops the
      second row (a padding token):

      >>> import jax.numpy as jnp
      >>> s = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
      >>> t = jnp.array([[3.0, 0.5, -1.0], [0.0, 4.0, 1.0]])
      >>> round(float(kd_loss(s, t, 2.0)), 4), round(float(kd_loss(s, t, 2.0, standardize=True)), 4)
      (0.2863, 0.0232)
      >>> round(float(kd_loss(100 * s, 100 * t, 2.0, standardize=True)), 4)
      0.0232
      >>> round(float(kd_loss(s, t, 2.0, standardize=True, where=jnp.array([True, False]))), 4)
      0.0037
    """
    _checks.check_kd_args(student_logits, teacher_logits, temperature, where)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    shape = jnp.shape(student_logits)
    if jnp.shape(teacher_logits) != shape:
        raise ValueError(f"student and teacher logits differ in shape: {shape} vs {jnp.shape(teacher_logits)}")
    num_rows = math.prod(shape[:-1])
    if row_axis is not None or vocab_axis is not None:
        tau = jnp.asarray(temperature, dtype=_compute_dtype(student_logits))
        return sharded_kd_loss(jnp.asarray(student_logits), jnp.asarray(teacher_logits), tau,
                               standardize=standardize, where=where, chunk_size=chunk_size,
                               row_axis=row_axis, vocab_axis=vocab_axis)
    if chunk_size is not None or num_rows * shape[-1] * 4 > DEFAULT_CHUNK_BYTES:
        rows = min(chunk_size or default_chunk_rows(shape[-1], num_rows), max(num_rows, 1))
        dtype = _compute_dtype(student_logits)
        tau = jnp.asarray(temperature, dtype=dtype)
        flat = lambda x: jnp.asarray(x).reshape(num_rows, shape[-1])  # noqa: E731
        weights = row_weights(shape[:-1], where, dtype)
        return chunked_kd_sum(flat(student_logits), flat(teacher_logits), tau, weights, standardize, rows)
    s = _maybe_standardize(student_logits, standardize)
    t = _maybe_standardize(jax.lax.stop_gradient(teacher_logits), standardize)
    tau = jnp.asarray(temperature, dtype=s.dtype)
    return _masked_mean(tau2_kl_rows(t, s, tau), where)


def _log_binary_split(log_probs: Array, target_mask: Array) -> Array:
    """``log [sum(p * g), sum(p * (1 - g))]`` along a new last axis of size 2.

    Computed in log space (``logsumexp`` over each part), which equals the log of the reference's
    summed probabilities but stays finite when one part underflows (logits of magnitude 1e4).
    """
    log_target = jnp.sum(log_probs * target_mask, axis=-1)
    log_other = jax.nn.logsumexp(jnp.where(target_mask > 0, -jnp.inf, log_probs), axis=-1)
    return jnp.stack([log_target, log_other], axis=-1)


def dkd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    alpha: float,
    beta: float,
    temperature: float | Array,
    standardize: bool = False,
    where: Array | None = None,
) -> Array:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (no warm-up factor; that is the method's job).

    With ``g`` the one-hot target mask and ``p = softmax(x / tau)`` (standardized ``x`` if enabled):
    ``TCKD = tau^2 * mean_rows KL(b_t || b_s)``, ``b = [sum(p g), sum(p (1 - g))]``, ``log b_s`` the
    log of the student's binary probabilities; ``NCKD = tau^2 * mean_rows KL(q_t || q_s)`` with
    ``q = softmax(x / tau - 1000 g)``.

    Args:
      student_logits, teacher_logits: ``[..., C]``.
      labels: integer ``[...]``.
      alpha, beta: weights of the target and non-target terms.
      temperature: scalar.
      standardize: logit standardization of both models first.
      where: optional boolean mask over the leading axes, as in :func:`kd_loss`.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
      >>> t = jnp.array([[3.0, 0.5, -1.0], [0.0, 4.0, 1.0]])
      >>> round(float(dkd_loss(s, t, jnp.array([0, 1]), alpha=1.0, beta=8.0, temperature=4.0)), 4)
      1.5795
    """
    _checks.check_dkd_args(student_logits, teacher_logits, labels, temperature, where)
    s = _maybe_standardize(student_logits, standardize)
    t = _maybe_standardize(jax.lax.stop_gradient(teacher_logits), standardize)
    tau = jnp.asarray(temperature, dtype=s.dtype)
    g = jax.nn.one_hot(labels, s.shape[-1], dtype=s.dtype)
    s_scaled, t_scaled = s / tau, t / tau

    log_b_student = _log_binary_split(jax.nn.log_softmax(s_scaled, axis=-1), g)
    log_b_teacher = _log_binary_split(jax.nn.log_softmax(t_scaled, axis=-1), g)
    tckd = _kl_rows(log_b_teacher, log_b_student)

    log_q_student = jax.nn.log_softmax(s_scaled - 1000.0 * g, axis=-1)
    log_q_teacher = jax.nn.log_softmax(t_scaled - 1000.0 * g, axis=-1)
    nckd = _kl_rows(log_q_teacher, log_q_student)

    return tau**2 * (alpha * _masked_mean(tckd, where) + beta * _masked_mean(nckd, where))


def _softmax_pair(student_logits: Array, teacher_logits: Array, temperature) -> tuple[Array, Array]:
    _checks.check_kd_args(student_logits, teacher_logits, temperature, None)
    s = _as_float(student_logits)
    t = _as_float(jax.lax.stop_gradient(teacher_logits))
    tau = jnp.asarray(temperature, dtype=s.dtype)
    return jax.nn.softmax(s / tau, axis=-1), jax.nn.softmax(t / tau, axis=-1)


def cc_loss(student_logits: Array, teacher_logits: Array, temperature: float | Array) -> Array:
    """MLKD's class-correlation loss: ``sum((P_t^T P_t - P_s^T P_s)^2) / C``.

    ``P = softmax(x / T)`` of shape ``[B, C]``; the Gram matrices are ``[C, C]``. No
    standardization in this term (as the reference).
    """
    p_s, p_t = _softmax_pair(student_logits, teacher_logits, temperature)
    diff = p_t.T @ p_t - p_s.T @ p_s
    return jnp.sum(diff * diff) / p_s.shape[-1]


def bc_loss(student_logits: Array, teacher_logits: Array, temperature: float | Array) -> Array:
    """MLKD's batch-correlation loss: ``sum((P_t P_t^T - P_s P_s^T)^2) / B``.

    ``P = softmax(x / T)`` of shape ``[B, C]``; the Gram matrices are ``[B, B]``.
    """
    p_s, p_t = _softmax_pair(student_logits, teacher_logits, temperature)
    diff = p_t @ p_t.T - p_s @ p_s.T
    return jnp.sum(diff * diff) / p_s.shape[0]


def _at_or_below_median(x: Array) -> Array:
    """Float mask ``x <= percentile(x, 50)`` (linear interpolation, as NumPy)."""
    return (x <= jnp.percentile(x, 50.0)).astype(x.dtype)


def mlkd_loss(
    student_weak: Array,
    student_strong: Array,
    teacher_weak: Array,
    teacher_strong: Array,
    labels: Array,
    *,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    standardize: bool = False,
) -> dict[str, Array]:
    """Multi-level logit distillation, exactly as the reference computes it.

    With ``Ts = [tau, 3, 5, 2, 6]``, ``conf = mean(max softmax(t_weak) <= its batch median)`` and
    ``cls = mean(sum_b softmax(t_weak) <= its median over classes)`` (the reference multiplies a
    batch-averaged scalar by a mask and takes the mean, so masks enter through their means):

    - ``ce = ce_weight * (CE(s_weak, y) + CE(s_strong, y))``
    - ``kd = kd_weight * [sum_Ts kd(s_w, t_w, T) * conf + sum_{tau,3,5} kd(s_s, t_s, T)
      + sum_{2,6} kd(s_w, t_w, T)]`` (the reference's strong-view sum uses the *weak* logits for
      T = 2 and 6; reproduced)
    - ``cc = kd_weight * sum_Ts cc(s_w, t_w, T) * cls``
    - ``bc = kd_weight * sum_Ts bc(s_w, t_w, T) * conf``

    Logit standardization applies inside ``kd`` only.

    Args:
      student_weak, student_strong, teacher_weak, teacher_strong: ``[B, C]`` logits of both views.
      labels: integer ``[B]``.
      temperature: the base temperature tau.
      ce_weight, kd_weight: loss weights.
      standardize: logit standardization in the KD terms.

    Returns:
      dict with scalar ``ce``, ``kd``, ``cc``, ``bc`` and ``total`` (their sum).
    """
    _checks.check_mlkd_args(student_weak, student_strong, teacher_weak, teacher_strong, labels,
                            temperature)
    temps = (float(temperature),) + MLKD_EXTRA_TEMPERATURES
    p_teacher = jax.nn.softmax(_as_float(jax.lax.stop_gradient(teacher_weak)), axis=-1)
    conf = jnp.mean(_at_or_below_median(jnp.max(p_teacher, axis=-1)))
    cls = jnp.mean(_at_or_below_median(jnp.sum(p_teacher, axis=0)))

    def kd(s, t, tau):
        return kd_loss(s, t, tau, standardize=standardize)

    ce = ce_weight * (cross_entropy(student_weak, labels) + cross_entropy(student_strong, labels))
    kd_weak = sum(kd(student_weak, teacher_weak, tau) for tau in temps) * conf
    kd_strong = sum(kd(student_strong, teacher_strong, tau) for tau in temps[:3])
    kd_strong += sum(kd(student_weak, teacher_weak, tau) for tau in temps[3:])
    kd_total = kd_weight * (kd_weak + kd_strong)
    cc = kd_weight * sum(cc_loss(student_weak, teacher_weak, tau) for tau in temps) * cls
    bc = kd_weight * sum(bc_loss(student_weak, teacher_weak, tau) for tau in temps) * conf
    return {"ce": ce, "kd": kd_total, "cc": cc, "bc": bc, "total": ce + kd_total + cc + bc}


@jax.custom_vjp
def gradient_reversal(x: Array, lam: float | Array) -> Array:
    """Identity in the forward pass; the backward pass multiplies the gradient by ``lam``.

    CTKD uses ``lam <= 0`` so that the temperature *ascends* the distillation loss. ``lam``
    receives no gradient.

    Example:
      >>> import jax
      >>> float(jax.grad(lambda x: gradient_reversal(x, -0.5))(1.0))
      -0.5
    """
    return x


def _grl_fwd(x, lam):
    return x, lam


def _grl_bwd(lam, g):
    return (lam * g).astype(g.dtype), jnp.zeros_like(lam)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def ctkd_temperature(
    raw: Array, lam: float | Array, *, t_start: float = 1.0, t_end: float = 20.0
) -> Array:
    """CTKD's global temperature ``T = t_start + t_end * sigmoid(GRL(raw, lam))``.

    Args:
      raw: the learnable scalar (initialised to 1 in training).
      lam: the gradient-reversal factor, see :func:`ctkd_lambda`.
    """
    raw = _as_float(raw)
    lam = jnp.asarray(lam, dtype=raw.dtype)
    return t_start + t_end * jax.nn.sigmoid(gradient_reversal(raw, lam))


def ctkd_lambda(
    epoch: int | Array, *, lmax: float = 0.0, lmin: float = -1.0, loops: int = 10
) -> Array:
    """CTKD's cosine curriculum of the gradient-reversal factor.

    ``lambda(e) = lmin + (lmax - lmin) * (cos(pi * min(e, loops) / loops) + 1) / 2``: ``lmax`` at
    epoch 0, ``lmin`` from epoch ``loops`` on. ``epoch`` may be traced.

    Example:
      >>> float(ctkd_lambda(0)), float(ctkd_lambda(5)), float(ctkd_lambda(10))
      (0.0, -0.5, -1.0)
    """
    e = jnp.minimum(jnp.asarray(epoch, dtype=jnp.float32), float(loops))
    return lmin + (lmax - lmin) * (jnp.cos(math.pi * e / loops) + 1.0) / 2.0

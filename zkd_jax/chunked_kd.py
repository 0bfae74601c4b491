"""KD with logit standardization at language-model scale: chunked over rows, fused with the head.

Two forms of ``L = sum_i w_i [tau^2 KL(softmax(Z(t_i) / tau) || softmax(Z(s_i) / tau))]`` over
``N`` rows (tokens) of ``V`` classes (vocabulary), ``w_i = m_i / max(sum m, 1)`` (``m`` the
``where`` mask, all ones by default), ``Z`` the z-score of :func:`zkd_jax.losses.standardize`
(or the identity):

- :func:`chunked_kd_sum`, under :func:`zkd_jax.losses.kd_loss` (``chunk_size``): a ``custom_vjp``
  whose residuals are the inputs and the row weights. Forward and backward each run a
  ``lax.scan`` over chunks of rows; the backward recomputes a chunk and differentiates it with
  autodiff, so the gradients are today's formula, including the temperature's cancellation-free
  derivative of :mod:`zkd_jax.tempered_kl`. Memory: a few ``[chunk, V]`` float32 arrays.
- :func:`kd_loss_from_hidden`: the output layer is fused in, ``s = h_s W_s + b_s`` and
  ``t = h_t W_t + b_t`` are never held for all tokens. The forward pass (chunks of rows) keeps
  per-row statistics: ``mean``, ``sigma`` and ``sigma + eps`` of both logits,
  ``lse(Z / tau)`` of both, ``r = sum_v (p_s - p_t) Z(s)``, ``lse(s)`` for the cross-entropy,
  ``d h / d tau`` (tempered_kl's exact form) when the temperature is differentiated. The backward
  pass runs over blocks of vocabulary columns for all rows: with ``c_i`` the row's cotangent,
  ``g_z = c tau (p_s - p_t)`` and, with standardization,
  ``g_s = g_z / (sigma + eps) - c tau r (s - mean) / ((sigma + eps) (V - 1) sigma)``
  (``mean(g_z) = 0``; the second term is 0 where ``sigma = 0``, the safe-sqrt convention), plus
  ``c ce_weight (softmax(s) - onehot(y))``; then ``dW_s[:, block] = h_s^T g_s``,
  ``db_s[block] = sum_rows g_s``, ``dh_s += g_s W_s[:, block]^T``.

A count of rows (or columns) not divisible by the chunk is handled without padding copies: the
full chunks run in the scan and the remainder is one more, smaller chunk at a static offset.
In the fused backward the two matrix products take ``g_s`` in the inputs' dtype (bf16 for a bf16
model, as that model's own backward would) and sum in float32; everything else is computed in
float32 (float64 for float64 inputs). 16-bit inputs are sliced through a uint16 view on XLA:CPU
(:func:`_as_bits`). Only JAX is imported (and :mod:`zkd_jax.tempered_kl`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from zkd_jax.tempered_kl import dh_dtau, kl_terms, tau2_kl_rows

Array = jax.Array

__all__ = ["DEFAULT_CHUNK_BYTES", "chunked_kd_sum", "default_chunk_rows", "kd_loss_from_hidden"]

# Float32 bytes of one [chunk, V] block; a chunk's temporaries are a few such blocks.
DEFAULT_CHUNK_BYTES = 16 * 2**20
EPS = 1e-7


def default_chunk_rows(num_classes: int, num_rows: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 ``[rows, num_classes]`` block is ``chunk_bytes``."""
    return int(max(1, min(num_rows, chunk_bytes // (4 * max(num_classes, 1)))))


def _check_chunk(chunk_size, name="chunk_size") -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name} must be a positive int or None (automatic), got {chunk_size!r}")


def zscore_stats(x: Array) -> tuple[Array, Array, Array, Array]:
    """``Z(x) = (x - mean) / (sigma + eps)`` over the last axis, with ``mean``, ``sigma``, ``sigma + eps``.

    The same formula as :func:`zkd_jax.losses.standardize` (unbiased std, safe sqrt: a constant
    row has ``sigma = 0`` and a zero derivative of ``sigma``). Stats have shape ``[...]``.
    """
    n = x.shape[-1]
    mean = jnp.mean(x, axis=-1)
    centered = x - mean[..., None]
    var = jnp.sum(centered * centered, axis=-1) / max(n - 1, 1)
    positive = var > 0
    sigma = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    den = sigma + EPS
    return centered / den[..., None], mean, sigma, den


def _kd_rows(s: Array, t: Array, tau: Array, standardize: bool) -> Array:
    """Per-row ``tau^2 KL`` of one chunk, computed in ``tau``'s dtype, teacher under stop_gradient."""
    s = s.astype(tau.dtype)
    t = lax.stop_gradient(t).astype(tau.dtype)
    if standardize:
        s, t = zscore_stats(s)[0], zscore_stats(t)[0]
    return tau2_kl_rows(t, s, tau)


def _scan_chunks(n: int, size: int, body, init):
    """``carry = body(carry, start, rows)`` over ``n // size`` chunks of ``size`` rows, then one of ``n % size``.

    The full chunks run in a ``lax.scan`` (``start`` traced); the remainder, if any, is one more
    call with a static ``start`` and a smaller static ``rows``: no padding copy, no overlap.
    """
    full, rest = divmod(n, size)

    def step(carry, i):
        return body(carry, i * size, size), None

    carry = lax.scan(step, init, jnp.arange(full))[0] if full else init
    return body(carry, full * size, rest) if rest else carry


def _as_bits(x: Array) -> Array:
    """On XLA:CPU, a 16-bit float array viewed as uint16; otherwise (and for other dtypes) ``x``.

    XLA:CPU's bf16 float normalization converts the whole operand of a bf16/f16 dynamic-slice or
    dynamic-update-slice to float32, and loop-invariant code motion hoists that copy out of the
    chunk loop (twice the input's bytes per array). Slicing the integer view instead costs one
    same-size copy (the bitcast is materialized there). Other backends slice 16-bit floats natively.
    """
    half = x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)
    return lax.bitcast_convert_type(x, jnp.uint16) if half and jax.default_backend() == "cpu" else x


def _from_bits(x: Array, dtype) -> Array:
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _rows(x: Array, start, size: int, axis: int = 0) -> Array:
    """``size`` entries of ``x`` along ``axis`` from ``start`` (sliced through :func:`_as_bits`)."""
    return _from_bits(lax.dynamic_slice_in_dim(_as_bits(x), start, size, axis=axis), x.dtype)


def _put_rows(x: Array, update: Array, start, axis: int = 0) -> Array:
    """``x`` with ``update`` written at ``start`` along ``axis`` (through :func:`_as_bits`)."""
    out = lax.dynamic_update_slice_in_dim(_as_bits(x), _as_bits(update.astype(x.dtype)), start, axis=axis)
    return _from_bits(out, x.dtype)


# ----------------------------------------------------------------------------- chunked kd_loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked_kd_sum(s: Array, t: Array, tau: Array, w: Array, standardize: bool, chunk: int) -> Array:
    """``sum_i w_i tau^2 KL(Z(t_i) || Z(s_i))`` over rows of ``s, t [N, V]``, in chunks of rows.

    Args:
      s, t: ``[N, V]`` student and teacher logits (any float dtype; computed in ``tau.dtype``).
      tau: scalar temperature in the compute dtype (float32 or float64).
      w: ``[N]`` row weights; rows with ``w == 0`` contribute nothing (even if not finite).
      standardize: z-score both first.
      chunk: rows per chunk (``1 <= chunk <= N``).
    """
    return _forward_sum(s, t, tau, w, standardize, chunk)


def _forward_sum(s, t, tau, w, standardize, chunk):
    def body(total, start, rows):
        h = _kd_rows(_rows(s, start, rows), _rows(t, start, rows), tau, standardize)
        wc = _rows(w, start, rows)
        return total + jnp.sum(jnp.where(wc != 0, wc * h, 0.0))

    return _scan_chunks(s.shape[0], chunk, body, jnp.zeros((), tau.dtype))


def _sum_fwd(s, t, tau, w, standardize, chunk):
    value = _forward_sum(s.value, t.value, tau.value, w.value, standardize, chunk)
    return value, (s.value, t.value, tau.value, w.value, tau.perturbed)


def _sum_bwd(standardize, chunk, res, g):
    s, t, tau, w, tau_perturbed = res
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), tau.dtype)

    def body(carry, start, rows):
        grad_s, grad_tau = carry
        t_c, wc = _rows(t, start, rows), _rows(w, start, rows)
        keep = wc != 0
        ct = jnp.where(keep, g * wc, 0.0)
        if tau_perturbed:
            _, vjp = jax.vjp(lambda x, tt: _kd_rows(x, t_c, tt, standardize), _rows(s, start, rows), tau)
            ds, dtau = vjp(ct)
            grad_tau = grad_tau + dtau
        else:
            _, vjp = jax.vjp(lambda x: _kd_rows(x, t_c, tau, standardize), _rows(s, start, rows))
            (ds,) = vjp(ct)
        new = jnp.where(keep[:, None], ds, 0.0).astype(s.dtype)
        return _put_rows(grad_s, new, start), grad_tau

    init = (jnp.zeros_like(s), jnp.zeros((), tau.dtype))
    grad_s, grad_tau = _scan_chunks(s.shape[0], chunk, body, init)
    return grad_s, jnp.zeros_like(t), grad_tau, jnp.zeros_like(w)


chunked_kd_sum.defvjp(_sum_fwd, _sum_bwd, symbolic_zeros=True)


def row_weights(leading_shape: tuple[int, ...], where: Array | None, dtype) -> Array:
    """``[N]`` weights of a masked mean: ``m / max(sum m, 1)``, or ``1 / N`` without a mask."""
    n = 1
    for d in leading_shape:
        n *= d
    if where is None:
        return jnp.full((n,), 1.0 / max(n, 1), dtype)
    mask = jnp.broadcast_to(jnp.asarray(where, dtype=bool), leading_shape).reshape(n)
    return mask.astype(dtype) / jnp.maximum(jnp.sum(mask).astype(dtype), 1.0)


# ----------------------------------------------------------------------------- fused with the head


def _logits(h: Array, w: Array, b: Array | None, dtype) -> Array:
    out = jnp.dot(h, w, preferred_element_type=dtype).astype(dtype)
    return out if b is None else out + b.astype(dtype)


def _fused_stats(hs, ws, bs, ht, wt, bt, tau, labels, standardize, rows, want_dtau):
    """Forward pass over chunks of rows: per-row loss terms and the statistics of the backward."""
    n, dtype = hs.shape[0], tau.dtype
    names = ["kd", "mean_s", "sig_s", "den_s", "lse_zs", "mean_t", "den_t", "lse_zt", "r"]
    names += ["ce", "lse_s"] if labels is not None else []
    names += ["dtau"] if want_dtau else []

    def body(stats, start, rows):
        s = _logits(_rows(hs, start, rows), ws, bs, dtype)
        t = lax.stop_gradient(_logits(_rows(ht, start, rows), wt, bt, dtype))
        one = jnp.ones((rows,), dtype)
        if standardize:
            zs, mean_s, sig_s, den_s = zscore_stats(s)
            zt, mean_t, _, den_t = zscore_stats(t)
        else:
            zs, zt, mean_s, sig_s, den_s, mean_t, den_t = s, t, 0 * one, one, one, 0 * one, one
        lse_zs = jax.nn.logsumexp(zs / tau, axis=-1)
        lse_zt = jax.nn.logsumexp(zt / tau, axis=-1)
        log_ps, log_pt = zs / tau - lse_zs[:, None], zt / tau - lse_zt[:, None]
        p_t, terms = kl_terms(log_pt, log_ps)
        row = {
            "kd": tau**2 * jnp.sum(terms, axis=-1), "mean_s": mean_s, "sig_s": sig_s,
            "den_s": den_s, "lse_zs": lse_zs, "mean_t": mean_t, "den_t": den_t, "lse_zt": lse_zt,
            "r": jnp.sum((jnp.exp(log_ps) - p_t) * zs, axis=-1),
        }
        if labels is not None:
            lse_s = jax.nn.logsumexp(s, axis=-1)
            y = _rows(labels, start, rows)
            row["lse_s"] = lse_s
            row["ce"] = lse_s - jnp.take_along_axis(s, y[:, None], axis=-1)[:, 0]
        if want_dtau:
            row["dtau"] = dh_dtau(zt, zs, tau)
        return {k: lax.dynamic_update_slice_in_dim(stats[k], row[k], start, 0) for k in names}

    init = {k: jnp.zeros((n,), dtype) for k in names}
    return _scan_chunks(n, rows, body, init)


def _fused_value(stats, w, ce_weight):
    per_row = stats["kd"] + (ce_weight * stats["ce"] if "ce" in stats else 0.0)
    return jnp.sum(jnp.where(w != 0, w * per_row, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _fused(hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight, standardize, rows, cols):
    stats = _fused_stats(hs, ws, bs, ht, wt, bt, tau, labels, standardize, rows, False)
    return _fused_value(stats, w, ce_weight)


def _fused_fwd(hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight, standardize, rows, cols):
    val = jax.tree.map(lambda p: p.value, (hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight))
    want_dtau = tau.perturbed
    stats = _fused_stats(*val[:7], val[8], standardize, rows, want_dtau)
    return _fused_value(stats, val[7], val[9]), (val, stats, want_dtau)


def _fused_bwd(standardize, rows, cols, res, g):
    (hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight), stats, want_dtau = res
    dtype = tau.dtype
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), dtype)
    n, v = hs.shape[0], ws.shape[1]
    c = jnp.where(w != 0, g * w, 0.0)  # each row's cotangent
    col = lambda x: x[:, None]  # noqa: E731
    if standardize:
        sig = stats["sig_s"]
        safe_sig = jnp.where(sig > 0, sig, 1.0)
        k = jnp.where(sig > 0, c * tau * stats["r"] / (stats["den_s"] * max(v - 1, 1) * safe_sig), 0.0)

    def body(carry, start, cols):
        d_hs, d_ws, d_bs = carry
        ws_b = _rows(ws, start, cols, axis=1)
        s = _logits(hs, ws_b, None if bs is None else _rows(bs, start, cols), dtype)
        t = _logits(ht, _rows(wt, start, cols, axis=1), None if bt is None else _rows(bt, start, cols), dtype)
        zs = (s - col(stats["mean_s"])) / col(stats["den_s"])
        zt = (t - col(stats["mean_t"])) / col(stats["den_t"])
        diff = jnp.exp(zs / tau - col(stats["lse_zs"])) - jnp.exp(zt / tau - col(stats["lse_zt"]))
        gs = col(c * tau) * diff
        if standardize:
            gs = gs / col(stats["den_s"]) - col(k) * (s - col(stats["mean_s"]))
        if labels is not None:
            onehot = col(labels) == start + jnp.arange(cols)[None, :]
            gs = gs + col(c * ce_weight) * (jnp.exp(s - col(stats["lse_s"])) - onehot)
        gs = jnp.where(col(c != 0), gs, 0.0)
        # products in the inputs' dtype (bf16 for a bf16 model, as its own backward), sums in float32
        d_ws_b = jnp.dot(hs.T, gs.astype(hs.dtype), preferred_element_type=dtype)
        d_ws = _put_rows(d_ws, d_ws_b, start, axis=1)
        if d_bs is not None:
            d_bs = _put_rows(d_bs, jnp.sum(gs, axis=0), start)
        d_hs = d_hs + jnp.dot(gs.astype(ws.dtype), ws_b.T, preferred_element_type=dtype)
        return d_hs, d_ws, d_bs

    init = (jnp.zeros((n, hs.shape[1]), dtype), jnp.zeros_like(ws), None if bs is None else jnp.zeros_like(bs))
    d_hs, d_ws, d_bs = _scan_chunks(v, cols, body, init)
    d_tau = g * jnp.sum(jnp.where(w != 0, w * stats["dtau"], 0.0)) if want_dtau else jnp.zeros_like(tau)
    zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731
    d_labels = None if labels is None else jnp.zeros(labels.shape, jax.dtypes.float0)
    return (d_hs.astype(hs.dtype), d_ws, d_bs, zeros(ht), zeros(wt), zeros(bt), d_tau,
            jnp.zeros_like(w), d_labels, jnp.zeros_like(ce_weight))


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def kd_loss_from_hidden(
    student_hidden: Array,
    student_head: Array,
    teacher_hidden: Array,
    teacher_head: Array,
    temperature: float | Array,
    *,
    standardize: bool = False,
    where: Array | None = None,
    chunk_size: int | None = None,
    student_bias: Array | None = None,
    teacher_bias: Array | None = None,
    labels: Array | None = None,
    ce_weight: float | Array = 0.0,
) -> Array:
    """:func:`zkd_jax.losses.kd_loss` of ``h_s W_s + b_s`` and ``h_t W_t + b_t``, never holding the logits.

    ``L = mean_rows [tau^2 KL(softmax(Z(t) / tau) || softmax(Z(s) / tau)) + ce_weight CE(s, y)]``
    (masked mean over ``where``; ``Z`` the identity without ``standardize``; the cross-entropy is
    on the raw student logits, as a language model's next-token loss). The teacher's hidden
    states, head and bias receive zero gradients; the student's hidden states, head, bias and a
    traced temperature (CTKD, tempered_kl's exact derivative) receive theirs. Logits are formed
    chunk by chunk (module doc); matrix products accumulate in float32 (float64 for float64), the
    backward's take the logits' gradient in the inputs' dtype.

    Args:
      student_hidden: ``[..., Hs]`` (e.g. ``[batch, seq, Hs]``).
      student_head: ``[Hs, V]``.
      teacher_hidden: ``[..., Ht]``, same leading axes.
      teacher_head: ``[Ht, V]``.
      temperature: scalar.
      standardize: logit standardization of both models' logits.
      where: optional boolean mask over the leading axes (padding tokens).
      chunk_size: rows per chunk of the forward pass (automatic from ``DEFAULT_CHUNK_BYTES`` if
        None); the backward's vocabulary blocks hold about as many elements.
      student_bias, teacher_bias: optional ``[V]``.
      labels: integer ``[...]`` next-token targets, needed when ``ce_weight`` is not 0.
      ce_weight: weight of the cross-entropy term.

    Returns:
      Scalar float32 (float64 for float64 inputs).
    """
    _check_chunk(chunk_size)
    hs, ht = jnp.asarray(student_hidden), jnp.asarray(teacher_hidden)
    ws, wt = jnp.asarray(student_head), jnp.asarray(teacher_head)
    lead = hs.shape[:-1]
    if ht.shape[:-1] != lead or ws.ndim != 2 or wt.ndim != 2 or ws.shape[0] != hs.shape[-1] \
            or wt.shape[0] != ht.shape[-1] or ws.shape[1] != wt.shape[1]:
        raise ValueError(
            "kd_loss_from_hidden expects student_hidden [..., Hs], student_head [Hs, V], "
            f"teacher_hidden [..., Ht], teacher_head [Ht, V]; got {hs.shape}, {ws.shape}, "
            f"{ht.shape}, {wt.shape}"
        )
    if labels is None and not (isinstance(ce_weight, (int, float)) and ce_weight == 0):
        raise ValueError("ce_weight is not 0: pass labels=[...] (integer next-token targets)")
    dtype = functools.reduce(jnp.promote_types, [hs.dtype, ws.dtype, jnp.float32])
    n, v = max(1, math.prod(lead)), ws.shape[1]
    rows = min(chunk_size or default_chunk_rows(v, n), n)
    cols = max(1, min(v, -(-rows * v // n)))
    tau = jnp.asarray(temperature, dtype)
    w = row_weights(lead, where, dtype)
    bias = lambda b: None if b is None else jnp.asarray(b)  # noqa: E731
    y = None if labels is None else jnp.broadcast_to(jnp.asarray(labels, jnp.int32), lead).reshape(n)
    return _fused(
        hs.reshape(n, hs.shape[-1]), ws, bias(student_bias), ht.reshape(n, ht.shape[-1]), wt,
        bias(teacher_bias), tau, w, y, jnp.asarray(ce_weight, dtype), standardize, rows, cols,
    )

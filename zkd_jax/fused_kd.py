"""The KD(+LS, +CE) loss fused with the output layer: ``custom_vjp`` of the weighted sum over rows.

:func:`zkd_jax.chunked_kd.kd_loss_from_hidden` is the public form (its module doc has the
algorithm); this is the loop on one device's rows and vocabulary columns. The forward pass forms
the logits of a chunk of rows (``h W + b``, padded to 128 lanes) and keeps the per-row statistics
of :func:`zkd_jax.kd_rows.row_stats`. The backward runs over blocks of the device's columns for all
rows: ``dW[:, block] = h^T g`` and ``db[block] = sum_rows g`` (summed over ``row_axis`` in float32
block by block), ``dh += g W[:, block]^T``; with the vocabulary sharded, ``dh`` is a second pass over
chunks of rows instead (``g W^T``, summed over the vocabulary axis), so that no float32 ``[N, H]``
array is held beside the blocks. Only JAX is imported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from zkd_jax.kd_rows import (
    fit_all, keep_stats, logits_grad, pad_cols, put, row_stats, scan_chunks, stat_names, take, weighted,
)

Array = jax.Array


def _logits(h: Array, w: Array, b: Array | None, dtype) -> Array:
    out = jnp.dot(h, w, preferred_element_type=dtype).astype(dtype)
    return out if b is None else out + b.astype(dtype)


def _fused_forward(hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight, standardize, rows, vocab, want_dtau):
    """Forward pass over chunks of rows: the weighted loss and the per-row statistics."""
    valid = vocab.valid()

    def body(carry, start, size):
        total, stats = carry
        s = pad_cols(_logits(take(hs, start, size), ws, bs, tau.dtype), vocab.width)
        t = lax.stop_gradient(pad_cols(_logits(take(ht, start, size), wt, bt, tau.dtype), vocab.width))
        y = None if labels is None else take(labels, start, size)
        st = row_stats(s, t, tau, vocab, valid, standardize, want_dtau, y)
        per_row = st["kd"] + (ce_weight * st["ce"] if labels is not None else 0.0)
        return weighted(total, take(w, start, size), per_row), keep_stats(stats, st, start)

    names = stat_names(standardize)
    names += ["lse_s"] * (labels is not None) + ["dtau"] * want_dtau
    init = (jnp.zeros((), tau.dtype), {k: jnp.zeros(w.shape, tau.dtype) for k in names})
    return scan_chunks(hs.shape[0], rows, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def fused_sum(hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight, standardize, rows, cols, vocab, row_axis):
    """``sum_i w_i [tau^2 KL + ce_weight CE]`` of the logits ``hs ws + bs`` and ``ht wt + bt``.

    ``hs, ht [N, H]``, ``ws, wt [H, cols of this device]``, ``bs, bt`` or None, ``tau`` (the
    compute dtype), ``w [N]``, ``labels [N]`` (global class indices) or None, ``ce_weight``;
    ``rows`` per chunk of the forward pass, ``cols`` per block of the backward, ``vocab`` the
    :class:`zkd_jax.kd_rows.Vocab` of this device, ``row_axis`` the mesh axis the rows are sharded
    over (the head's gradient is summed over it), or None.
    """
    args = (hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight)
    return _fused_forward(*args, standardize, rows, vocab, False)[0]


def _fused_fwd(hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight, standardize, rows, cols, vocab, row_axis):
    val = jax.tree.map(lambda p: p.value, (hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight))
    value, stats = _fused_forward(*val, standardize, rows, vocab, tau.perturbed)
    return value, (val, stats)


def _fused_bwd(standardize, rows, cols, vocab, row_axis, res, g):
    (hs, ws, bs, ht, wt, bt, tau, w, labels, ce_weight), stats = res
    dtype = tau.dtype
    g = jnp.zeros((), dtype) if isinstance(g, SymbolicZero) else g
    c = jnp.where(w != 0, g * w, 0.0)  # each row's cotangent
    two_pass = vocab.axis is not None
    over_rows = (lambda x: lax.psum(x, row_axis)) if row_axis else (lambda x: x)  # noqa: E731

    def block(carry, start, size):  # all rows, columns start .. start + size of this device's
        d_hs, d_ws, d_bs = carry
        ws_b = take(ws, start, size, axis=1)
        s = _logits(hs, ws_b, None if bs is None else take(bs, start, size), dtype)
        t = _logits(ht, take(wt, start, size, axis=1), None if bt is None else take(bt, start, size), dtype)
        gs = logits_grad(s, t, stats, c, tau, vocab, vocab.valid(start, size), start, ce_weight, labels)
        # products in the inputs' dtype (bf16 for a bf16 model, as its own backward), sums in float32
        d_ws_b = jnp.dot(hs.T, gs.astype(hs.dtype), preferred_element_type=dtype)
        d_ws = put(d_ws, over_rows(d_ws_b), start, axis=1)
        if d_bs is not None:
            d_bs = put(d_bs, over_rows(jnp.sum(gs, axis=0)), start)
        if not two_pass:
            d_hs = d_hs + jnp.dot(gs.astype(ws.dtype), ws_b.T, preferred_element_type=dtype)
        return d_hs, d_ws, d_bs

    def row_chunk(d_hs, start, size):  # rows start .. start + size, all of this device's columns
        st = {k: take(v, start, size) for k, v in stats.items()}
        s = pad_cols(_logits(take(hs, start, size), ws, bs, dtype), vocab.width)
        t = pad_cols(_logits(take(ht, start, size), wt, bt, dtype), vocab.width)
        y = None if labels is None else take(labels, start, size)
        gs = logits_grad(s, t, st, take(c, start, size), tau, vocab, vocab.valid(), 0, ce_weight, y)
        part = jnp.dot(gs[:, : ws.shape[1]].astype(ws.dtype), ws.T, preferred_element_type=dtype)
        return put(d_hs, lax.psum(part, vocab.axis), start)

    d_hs0 = jnp.zeros(hs.shape, hs.dtype if two_pass else dtype)
    bias0 = None if bs is None else jnp.zeros_like(bs)
    init = (None if two_pass else d_hs0, jnp.zeros_like(ws), bias0)
    d_hs, d_ws, d_bs = scan_chunks(ws.shape[1], cols, block, init)
    if two_pass:
        d_hs = scan_chunks(hs.shape[0], rows, row_chunk, d_hs0)
    d_tau = jnp.sum(jnp.where(w != 0, c * stats["dtau"], 0.0)) if "dtau" in stats else jnp.zeros_like(tau)
    zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731
    d_labels = None if labels is None else jnp.zeros(labels.shape, jax.dtypes.float0)
    cts = (d_hs.astype(hs.dtype), d_ws, d_bs, zeros(ht), zeros(wt), zeros(bt), d_tau,
           jnp.zeros_like(w), None, jnp.zeros_like(ce_weight))
    out = fit_all(cts, (hs, ws, bs, ht, wt, bt, tau, w, None, ce_weight))
    return out[:8] + (d_labels,) + out[9:]


fused_sum.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)

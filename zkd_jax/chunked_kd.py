"""KD with logit standardization at language-model scale: chunked over rows, fused with the head,
sharded over rows and over the vocabulary.

Two forms of ``L = sum_i w_i [tau^2 KL(softmax(Z(t_i) / tau) || softmax(Z(s_i) / tau))]`` over
``N`` rows (tokens) of ``V`` classes (vocabulary), ``w_i = m_i / max(sum m, 1)`` (``m`` the
``where`` mask, all ones by default), ``Z`` the z-score of :func:`zkd_jax.losses.standardize`
(or the identity):

- :func:`chunked_kd_sum`, under :func:`zkd_jax.losses.kd_loss` (``chunk_size``): a ``custom_vjp``
  whose residuals are the inputs, the row weights and a few ``[N]`` per-row statistics. The forward
  pass runs a ``lax.scan`` over chunks of rows and keeps the statistics; the backward recomputes a
  chunk and forms its gradient in closed form (:func:`zkd_jax.kd_rows.logits_grad`), including the
  temperature's cancellation-free derivative of :mod:`zkd_jax.tempered_kl`. Memory: a few
  ``[chunk, V]`` float32 arrays.
- :func:`kd_loss_from_hidden`: the output layer is fused in, ``s = h_s W_s + b_s`` and
  ``t = h_t W_t + b_t`` are never held for all tokens. The forward pass (chunks of rows) keeps the
  per-row statistics (plus the cross-entropy's ``lse(s)``); the backward runs over blocks of
  vocabulary columns (a multiple of 128) for all rows: ``dW_s[:, block] = h_s^T g_s``,
  ``db_s[block] = sum_rows g_s``, ``dh_s += g_s W_s[:, block]^T``. With the vocabulary sharded,
  ``dh_s`` is a second pass over chunks of rows (``g_s W_s^T`` summed over the shards), so that no
  float32 ``[N, H]`` gradient is held beside the blocks.

Sharded (``row_axis`` / ``vocab_axis``, names of axes of the mesh in context): a ``shard_map``
over those axes runs the same loops on each device's rows and columns; the reductions over the
vocabulary are ``psum`` / ``pmax`` over ``vocab_axis`` (:mod:`zkd_jax.kd_rows`), the head's
gradient is summed over ``row_axis`` block by block in float32. Rows that do not divide by the
chunk leave one smaller chunk at a static offset (no padding copy); a block of columns is padded
to 128 lanes and the padding excluded from every statistic. The two matrix products of the
backward take ``g_s`` in the inputs' dtype (bf16 for a bf16 model, as its own backward would) and
sum in float32; everything else is float32 (float64 for float64 inputs). Only JAX is imported.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from zkd_jax.fused_kd import fused_sum
from zkd_jax.kd_rows import (
    EPS, LANES, Vocab, fit_all, keep_stats, lanes, logits_grad, pad_cols, put, row_stats, scan_chunks,
    stat_names, take, weighted,
)

Array = jax.Array

__all__ = ["DEFAULT_CHUNK_BYTES", "chunked_kd_sum", "default_chunk_rows", "kd_loss_from_hidden",
           "sharded_kd_loss"]

# Float32 bytes of one [chunk, V] block; a chunk's temporaries are a few such blocks.
DEFAULT_CHUNK_BYTES = 16 * 2**20


def default_chunk_rows(num_classes: int, num_rows: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one float32 ``[rows, num_classes]`` block is at most ``chunk_bytes``,
    rounded down to a multiple of 128 (8) rows when it is at least 128 (8): a TPU may lay out a
    ``[N, V]`` array whose ``V`` is not a multiple of 128 with the rows as the minor (lane) axis,
    where a chunk of rows that is not aligned would make XLA copy the whole array."""
    rows = int(max(1, min(num_rows, chunk_bytes // (4 * max(num_classes, 1)))))
    align = 128 if rows >= 128 else 8 if rows >= 8 else 1
    return rows - rows % align


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


def row_weights(leading_shape: tuple[int, ...], where: Array | None, dtype) -> Array:
    """``[N]`` weights of a masked mean: ``m / max(sum m, 1)``, or ``1 / N`` without a mask."""
    n = math.prod(leading_shape)
    if where is None:
        return jnp.full((n,), 1.0 / max(n, 1), dtype)
    mask = jnp.broadcast_to(jnp.asarray(where, dtype=bool), leading_shape).reshape(n)
    return mask.astype(dtype) / jnp.maximum(jnp.sum(mask).astype(dtype), 1.0)


def _local_vocab(v: int) -> Vocab:
    return Vocab(v, v, lanes(v))


def _block(x: Array, start, rows: int, vocab: Vocab, dtype) -> Array:
    return pad_cols(take(x, start, rows).astype(dtype), vocab.width)


# ----------------------------------------------------------------------------- chunked kd_loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_kd_sum(s: Array, t: Array, tau: Array, w: Array, standardize: bool, chunk: int,
                   vocab: Vocab | None = None) -> Array:
    """``sum_i w_i tau^2 KL(Z(t_i) || Z(s_i))`` over rows of ``s, t [N, V]``, in chunks of rows.

    Args:
      s, t: ``[N, V]`` student and teacher logits (any float dtype; computed in ``tau.dtype``).
      tau: scalar temperature in the compute dtype (float32 or float64).
      w: ``[N]`` row weights; rows with ``w == 0`` contribute nothing (even if not finite).
      standardize: z-score both first.
      chunk: rows per chunk (``1 <= chunk <= N``).
      vocab: the columns' layout when ``V`` is a shard of a vocabulary sharded over a mesh axis
        (inside ``shard_map``); None: all ``V`` here.
    """
    return _kd_forward(s, t, tau, w, standardize, chunk, vocab, False)[0]


def _kd_forward(s, t, tau, w, standardize, chunk, vocab, want_dtau):
    vocab = vocab or _local_vocab(s.shape[1])
    valid = vocab.valid()

    def body(carry, start, rows):
        total, stats = carry
        st = row_stats(_block(s, start, rows, vocab, tau.dtype),
                       lax.stop_gradient(_block(t, start, rows, vocab, tau.dtype)),
                       tau, vocab, valid, standardize, want_dtau)
        return weighted(total, take(w, start, rows), st["kd"]), keep_stats(stats, st, start)

    names = stat_names(standardize) + ["dtau"] * want_dtau
    init = (jnp.zeros((), tau.dtype), {k: jnp.zeros(w.shape, tau.dtype) for k in names})
    return scan_chunks(s.shape[0], chunk, body, init)


def _kd_fwd(s, t, tau, w, standardize, chunk, vocab):
    want_dtau = tau.perturbed
    value, stats = _kd_forward(s.value, t.value, tau.value, w.value, standardize, chunk, vocab, want_dtau)
    return value, (s.value, t.value, tau.value, w.value, stats)


def _kd_bwd(standardize, chunk, vocab, res, g):
    s, t, tau, w, stats = res
    g = jnp.zeros((), tau.dtype) if isinstance(g, SymbolicZero) else g
    vocab = vocab or _local_vocab(s.shape[1])
    valid = vocab.valid()
    c = jnp.where(w != 0, g * w, 0.0)

    def body(grad_s, start, rows):
        st = {k: take(v, start, rows) for k, v in stats.items()}
        gs = logits_grad(_block(s, start, rows, vocab, tau.dtype), _block(t, start, rows, vocab, tau.dtype),
                         st, take(c, start, rows), tau, vocab, valid)
        return put(grad_s, gs[:, : s.shape[1]], start)

    grad_s = scan_chunks(s.shape[0], chunk, body, jnp.zeros_like(s))
    d_tau = jnp.sum(jnp.where(w != 0, c * stats["dtau"], 0.0)) if "dtau" in stats else jnp.zeros_like(tau)
    return fit_all((grad_s, jnp.zeros_like(t), d_tau, jnp.zeros_like(w)), (s, t, tau, w))


chunked_kd_sum.defvjp(_kd_fwd, _kd_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- entry points


def _mesh_axes(row_axis: str | None, vocab_axis: str | None):
    """The mesh in context, the named axes and whether they are already manual (inside the
    caller's ``shard_map``)."""
    mesh = jax.sharding.get_abstract_mesh()
    names = tuple(a for a in (row_axis, vocab_axis) if a is not None)
    if row_axis is not None and row_axis == vocab_axis:
        raise ValueError(f"row_axis and vocab_axis must be different mesh axes, both are {row_axis!r}")
    if mesh.empty or any(a not in mesh.axis_names for a in names):
        have = mesh.axis_names if not mesh.empty else "no mesh"
        raise ValueError(f"row_axis/vocab_axis {names} must name axes of the mesh in context "
                         f"(with jax.set_mesh(mesh): ...); the context has {have}")
    manual = [a in mesh.manual_axes for a in names]
    if any(manual) and not all(manual):
        raise ValueError(f"inside shard_map, both row_axis and vocab_axis must be manual axes; {names}")
    return mesh, names, all(manual)


def _pad_to(x: Array | None, axis: int, size: int, value=0) -> Array | None:
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _layout(mesh, inside: bool, n: int, v: int, row_axis, vocab_axis):
    """Rows and columns after padding to the shard counts (outside ``shard_map``), and the
    per-device :class:`Vocab`."""
    size_of = lambda a: 1 if a is None else (lax.axis_size(a) if inside else mesh.shape[a])  # noqa: E731
    rs, vs = size_of(row_axis), size_of(vocab_axis)
    if inside:  # the caller's shard_map gave this device its block: all columns are real
        return n, v, Vocab(v * vs, v, lanes(v), vocab_axis)
    n_pad, v_pad = -(-n // rs) * rs, -(-v // vs) * vs
    return n_pad, v_pad, Vocab(v, v_pad // vs, lanes(v_pad // vs), vocab_axis)


def _run(body, args: dict, specs: dict, names, inside: bool):
    if inside:
        return body(args)
    return jax.shard_map(body, in_specs=(specs,), out_specs=P(), axis_names=set(names), check_vma=True)(args)


def _mask(where, lead: tuple[int, ...], n: int) -> Array:
    if where is None:
        return jnp.ones((n,), bool)
    return jnp.broadcast_to(jnp.asarray(where, bool), lead).reshape(n)


def _row_weights(mask: Array, row_axis, dtype) -> Array:
    count = jnp.sum(mask.astype(dtype))
    count = lax.psum(count, row_axis) if row_axis else count
    return mask.astype(dtype) / jnp.maximum(count, 1.0)


def sharded_kd_loss(student: Array, teacher: Array, tau: Array, *, standardize: bool, where,
                    chunk_size: int | None, row_axis: str | None, vocab_axis: str | None) -> Array:
    """:func:`zkd_jax.losses.kd_loss` with logits sharded as ``[rows over row_axis, ..., vocabulary
    over vocab_axis]`` (module doc); ``tau`` in the compute dtype."""
    mesh, names, inside = _mesh_axes(row_axis, vocab_axis)
    lead, v = student.shape[:-1], student.shape[-1]
    n = math.prod(lead)
    mask = _mask(where, lead, n)
    n_pad, v_pad, vocab = _layout(mesh, inside, n, v, row_axis, vocab_axis)
    flat = lambda x: _pad_to(_pad_to(x.reshape(n, v), 0, n_pad), 1, v_pad)  # noqa: E731
    args = {"s": flat(student), "t": flat(teacher), "tau": tau, "mask": _pad_to(mask, 0, n_pad, False)}
    spec = P(row_axis, vocab_axis)

    def body(a):
        rows = a["s"].shape[0]
        chunk = min(chunk_size or default_chunk_rows(vocab.width, rows), rows)
        w = _row_weights(a["mask"], row_axis, tau.dtype)
        part = chunked_kd_sum(a["s"], a["t"], a["tau"], w, standardize, chunk, vocab)
        return lax.psum(part, row_axis) if row_axis else part

    return _run(body, args, {"s": spec, "t": spec, "tau": P(), "mask": P(row_axis)}, names, inside)


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
    row_axis: str | None = None,
    vocab_axis: str | None = None,
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
        None); the backward's vocabulary blocks (a multiple of 128) hold about as many elements.
      student_bias, teacher_bias: optional ``[V]``.
      labels: integer ``[...]`` next-token targets, needed when ``ce_weight`` is not 0.
      ce_weight: weight of the cross-entropy term.
      row_axis: name of an axis of the mesh in context (``jax.set_mesh``) the rows (first leading
        axis of the hidden states, labels, mask) are sharded over; None: not sharded.
      vocab_axis: name of the mesh axis the heads' (and biases') vocabulary is sharded over.

    Returns:
      Scalar float32 (float64 for float64 inputs).

    >>> import jax.numpy as jnp
    >>> h, w = jnp.ones((2, 3, 4)), jnp.eye(4, 6)
    >>> round(float(kd_loss_from_hidden(h, w, h, w, 2.0, standardize=True)), 6)
    0.0
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
    tau, cw = jnp.asarray(temperature, dtype), jnp.asarray(ce_weight, dtype)
    mask = _mask(where, lead, n)
    y = None if labels is None else jnp.broadcast_to(jnp.asarray(labels, jnp.int32), lead).reshape(n)
    if row_axis is None and vocab_axis is None:
        mesh, names, inside, n_pad, v_pad, vocab = None, (), True, n, v, _local_vocab(v)
    else:
        mesh, names, inside = _mesh_axes(row_axis, vocab_axis)
        n_pad, v_pad, vocab = _layout(mesh, inside, n, v, row_axis, vocab_axis)
    rows_of = lambda x: _pad_to(x, 0, n_pad)  # noqa: E731
    cols_of = lambda x: None if x is None else _pad_to(jnp.asarray(x), x.ndim - 1, v_pad)  # noqa: E731
    args = {"hs": rows_of(hs.reshape(n, -1)), "ws": cols_of(ws), "bs": cols_of(student_bias),
            "ht": rows_of(ht.reshape(n, -1)), "wt": cols_of(wt), "bt": cols_of(teacher_bias),
            "tau": tau, "cw": cw, "mask": _pad_to(mask, 0, n_pad, False), "y": rows_of(y)}
    args = {k: x for k, x in args.items() if x is not None}
    specs = {"hs": P(row_axis), "ht": P(row_axis), "ws": P(None, vocab_axis), "wt": P(None, vocab_axis),
             "bs": P(vocab_axis), "bt": P(vocab_axis), "tau": P(), "cw": P(), "mask": P(row_axis),
             "y": P(row_axis)}

    def body(a):
        local_n = a["hs"].shape[0]
        rows = min(chunk_size or default_chunk_rows(vocab.width, local_n), local_n)
        cols = min(vocab.local, max(LANES, rows * vocab.local // local_n // LANES * LANES))
        w = _row_weights(a["mask"], row_axis, dtype) if names else row_weights(lead, where, dtype)
        part = fused_sum(a["hs"], a["ws"], a.get("bs"), a["ht"], a["wt"], a.get("bt"), a["tau"], w,
                      a.get("y"), a["cw"], standardize, rows, cols, vocab, row_axis)
        return lax.psum(part, row_axis) if row_axis else part

    return _run(body, args, {k: specs[k] for k in args}, names, inside)

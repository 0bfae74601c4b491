"""KD from a teacher's top-k logits, with logit standardization exact for the full vocabulary.

An offline teacher cache keeps, per token, the teacher's ``k`` largest logits ``t_j`` (``j`` in the
top-k set ``K``, indices into the vocabulary of size ``V``) and three numbers of its *full*
vocabulary (:class:`TeacherStats`): the mean ``mu``, the unbiased standard deviation ``sigma`` and
the log-partition ``A = log sum_{v<V} exp(Z(t)_v / tau)``, with ``Z(t) = (t - mu) / (sigma + eps)``
(:func:`zkd_jax.losses.standardize`, ``eps = 1e-7``; ``Z`` is the identity without
standardization, then ``A = logsumexp(t / tau)``). With them the teacher's probabilities on ``K``
are exactly the full teacher's, not renormalized over the subset:

    ``log p_j = Z(t)_j / tau - A``  for ``j`` in ``K``, and ``P_tail = 1 - sum_{j in K} p_j``.

The student's logits ``s`` are all there (``[..., V]``), so its ``q = softmax(Z(s) / tau)`` is the
full-vocabulary one. The loss (``tail=``) is ``tau^2`` times

- ``"bucket"`` (default): the KL of the ``k + 1``-way distributions ``(p_K, P_tail)`` and
  ``(q_K, Q_tail)``, ``sum_{j in K} p_j log(p_j / q_j) + P_tail log(P_tail / Q_tail)``, with
  ``Q_tail = sum_{v not in K} q_v`` computed from the student's non-top-k logits (not as
  ``1 - sum q_K``, which loses the digits of a small tail). The tail's mass is kept, its shape is
  not: by the data-processing inequality this is a lower bound of the full KL, equal to it when
  ``k = V`` (then there is no tail).
- ``"renormalize"``: the KL of both distributions conditioned on ``K``,
  ``sum_j p~_j log(p~_j / q~_j)`` with ``p~ = p_K / sum p_K`` and ``q~ = q_K / sum q_K``. ``A``
  cancels (and so does ``mu``); ``sigma`` does not: the z-score uses the full vocabulary's, so
  the teacher's temperature is the one of the dense loss (a z-score over the subset's own std,
  which is smaller, would sharpen the teacher).

Both equal :func:`zkd_jax.kd_loss` when ``k = V`` (``K`` any permutation of the vocabulary).

Without statistics (``stats=None``: an older cache, a teacher behind an API): only
``tail="renormalize"`` is defined, and the teacher's z-score uses the mean and standard deviation
of its ``k`` values (an approximation: the subset's spread is smaller than the vocabulary's).
When the ``k`` values are log-probabilities at temperature 1 (what APIs return),
:func:`flat_tail_stats` estimates the statistics by spreading the missing mass ``1 - sum exp`` evenly
over the ``V - k`` other entries ("flat tail"); that is exact for ``mu``, ``sigma`` and ``A`` when
the tail is indeed flat and otherwise an approximation; both tails then work.

Sharding (keyword-only ``row_axis`` / ``vocab_axis``, names of axes of the mesh in context,
``jax.set_mesh``, or of ``mesh=``): the function runs in a ``shard_map``; tokens are split over
``row_axis`` (their count divisible by its size), the student's vocabulary over ``vocab_axis``
(``V`` divisible by its size); the top-k arrays and statistics are split over rows only. Means,
standard deviations, log-partitions and the top-k gathers are summed across ``vocab_axis``, so
the values are those of the unsharded function. :func:`topk_kd_loss_from_hidden` has no axis
names: jitted with sharded inputs, XLA partitions it (equal values and gradients, tested).

Only JAX is imported (and :mod:`zkd_jax.tempered_kl`, :mod:`zkd_jax.chunked_kd`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from zkd_jax.chunked_kd import default_chunk_rows, row_weights
from zkd_jax.tempered_kl import kl_terms

Array = jax.Array
EPS = 1e-7
TAILS = ("bucket", "renormalize")

__all__ = ["TeacherStats", "flat_tail_stats", "teacher_stats", "teacher_top_k",
           "teacher_topk_log_probs", "topk_kd_loss", "topk_kd_loss_from_hidden"]


class TeacherStats(NamedTuple):
    """Per-token statistics of the teacher's full-vocabulary logits, each ``[...]`` float32.

    ``mean`` and ``std`` (unbiased, without ``eps``) of the raw logits; ``log_partition`` =
    ``logsumexp(Z(t) / tau)`` over the vocabulary at the cache's temperature (``Z`` the z-score
    when standardized, else the identity).
    """

    mean: Array
    std: Array
    log_partition: Array


def _safe_sqrt(x: Array) -> Array:
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def teacher_stats(teacher_logits: Array, temperature: float, *, standardize: bool) -> TeacherStats:
    """:class:`TeacherStats` of ``teacher_logits [..., V]`` (float32).

    >>> import jax.numpy as jnp
    >>> st = teacher_stats(jnp.array([[0.0, 1.0, 2.0]]), 2.0, standardize=True)
    >>> [round(float(x[0]), 4) for x in st]
    [1.0, 1.0, 1.1803]
    """
    t = jnp.asarray(teacher_logits, jnp.float32)
    n = t.shape[-1]
    mean = jnp.mean(t, axis=-1)
    centered = t - mean[..., None]
    std = _safe_sqrt(jnp.sum(centered * centered, axis=-1) / max(n - 1, 1))
    z = centered / (std[..., None] + EPS) if standardize else t
    return TeacherStats(mean, std, jax.nn.logsumexp(z / temperature, axis=-1))


def teacher_top_k(teacher_logits: Array, k: int, temperature: float, *, standardize: bool):
    """``(indices int32 [..., k], values [..., k], TeacherStats)``: what a cache stores per token."""
    t = jnp.asarray(teacher_logits)
    values, indices = lax.top_k(t, k)
    return indices.astype(jnp.int32), values, teacher_stats(t, temperature, standardize=standardize)


def _teacher_z(top: Array, stats: TeacherStats | None, standardize: bool) -> Array:
    top = jnp.asarray(top, jnp.float32)
    if not standardize:
        return top
    if stats is None:  # the subset's own z-score (the approximation without statistics)
        k = top.shape[-1]
        mean = jnp.mean(top, axis=-1, keepdims=True)
        std = _safe_sqrt(jnp.sum((top - mean) ** 2, axis=-1, keepdims=True) / max(k - 1, 1))
        return (top - mean) / (std + EPS)
    return (top - stats.mean[..., None]) / (stats.std[..., None] + EPS)


def teacher_topk_log_probs(top_logits: Array, stats: TeacherStats, temperature: float, *,
                           standardize: bool) -> Array:
    """``log p_j = Z(t)_j / tau - A`` on the top-k: the full teacher's log-probabilities there."""
    z = _teacher_z(top_logits, stats, standardize)
    return z / temperature - stats.log_partition[..., None]


def flat_tail_stats(top_log_probs: Array, vocab_size: int, temperature: float, *,
                    standardize: bool) -> TeacherStats:
    """Statistics estimated from top-k log-probabilities (temperature 1) alone: the flat tail.

    The ``V - k`` missing entries all get ``c = log((1 - sum_j exp(l_j)) / (V - k))``; ``mean``,
    ``std`` and ``log_partition`` are those of the completed vector (exact if the tail is flat).
    """
    lp = jnp.asarray(top_log_probs, jnp.float32)
    k = lp.shape[-1]
    rest = vocab_size - k
    if rest <= 0:
        return teacher_stats(lp, temperature, standardize=standardize)
    mass = -jnp.expm1(jnp.minimum(jax.nn.logsumexp(lp, axis=-1), -1e-7))
    c = jnp.log(mass) - math.log(rest)
    mean = (jnp.sum(lp, axis=-1) + rest * c) / vocab_size
    ss = jnp.sum((lp - mean[..., None]) ** 2, axis=-1) + rest * (c - mean) ** 2
    std = _safe_sqrt(ss / max(vocab_size - 1, 1))
    den = std + EPS if standardize else 1.0
    shift = mean if standardize else 0.0
    z_top = (lp - jnp.expand_dims(shift, -1)) / jnp.expand_dims(den, -1)
    z_tail = (c - shift) / den + temperature * math.log(rest)
    a = jax.nn.logsumexp(jnp.concatenate([z_top, z_tail[..., None]], axis=-1) / temperature, axis=-1)
    return TeacherStats(mean, std, a)


def _rows_loss(s, offset, vocab, idx, top, stats, tau, standardize, tail, vocab_axis):
    """Per-row ``tau^2 KL`` of ``n`` rows; ``s [n, Vb]`` is the student's block from ``offset``."""
    psum = (lambda x: lax.psum(x, vocab_axis)) if vocab_axis else (lambda x: x)
    pmax = (lambda x: lax.pmax(x, vocab_axis)) if vocab_axis else (lambda x: x)
    s = s.astype(jnp.float32)
    n, block = s.shape
    k = idx.shape[-1]
    if standardize:
        mean = psum(jnp.sum(s, axis=-1)) / vocab
        centered = s - mean[:, None]
        sigma = _safe_sqrt(psum(jnp.sum(centered * centered, axis=-1)) / max(vocab - 1, 1))
        s = centered / (sigma + EPS)[:, None]
    x = s / tau
    m = pmax(lax.stop_gradient(jnp.max(x, axis=-1)))
    e = jnp.exp(x - m[:, None])
    lse_s = m + jnp.log(psum(jnp.sum(e, axis=-1)))
    local = idx - offset
    inside = (local >= 0) & (local < block)
    xk = psum(jnp.where(inside, jnp.take_along_axis(x, jnp.where(inside, local, 0), axis=-1), 0.0))
    log_q = xk - lse_s[:, None]
    z_t = _teacher_z(top, stats, standardize)
    if stats is None:
        log_p = jax.nn.log_softmax(z_t / tau, axis=-1)
    else:
        log_p = z_t / tau - stats.log_partition[:, None].astype(jnp.float32)
    if tail == "renormalize":
        log_p = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
    elif k < vocab:
        covered = jnp.minimum(jax.nn.logsumexp(log_p, axis=-1), 0.0)
        p_tail = -jnp.expm1(covered)
        log_p_tail = jnp.where(p_tail > 0, jnp.log(jnp.where(p_tail > 0, p_tail, 1.0)), -jnp.inf)
        member = jnp.zeros((n, block), bool).at[jnp.arange(n)[:, None], jnp.where(inside, local, block)]
        member = member.set(True, mode="drop")
        tail_sum = psum(jnp.sum(jnp.where(member, 0.0, e), axis=-1))
        log_q_tail = m + jnp.log(jnp.maximum(tail_sum, jnp.finfo(jnp.float32).tiny)) - lse_s
        log_p = jnp.concatenate([log_p, log_p_tail[:, None]], axis=-1)
        log_q = jnp.concatenate([log_q, log_q_tail[:, None]], axis=-1)
    return tau**2 * jnp.sum(kl_terms(lax.stop_gradient(log_p), log_q)[1], axis=-1)


def _check(student_lead, vocab, idx, top, stats, tail):
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if idx.shape != top.shape or idx.shape[:-1] != student_lead or idx.shape[-1] > vocab:
        raise ValueError(
            f"top-k indices and values must both be [..., k] with the student's leading axes "
            f"{student_lead} and k <= V = {vocab}; got {idx.shape} and {top.shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"top-k indices must be integers, got {idx.dtype}")
    if stats is None and tail != "renormalize":
        raise ValueError("without teacher statistics only tail='renormalize' is defined: pass "
                         "stats=TeacherStats(...) (or flat_tail_stats(...) for log-probabilities)")


def _flat_stats(stats, n):
    return None if stats is None else TeacherStats(*(jnp.asarray(x, jnp.float32).reshape(n) for x in stats))


def topk_kd_loss(
    student_logits: Array,
    top_indices: Array,
    top_logits: Array,
    temperature: float | Array,
    *,
    stats: TeacherStats | None = None,
    standardize: bool = False,
    tail: str = "bucket",
    where: Array | None = None,
    row_axis: str | None = None,
    vocab_axis: str | None = None,
    mesh=None,
) -> Array:
    """Mean over tokens of ``tau^2 KL`` between the teacher's top-k and the student (module doc).

    Args:
      student_logits: ``[..., V]`` (any float dtype; computed in float32).
      top_indices: int ``[..., k]``, the teacher's top-k vocabulary ids per token.
      top_logits: ``[..., k]``, the teacher's raw logits there (bf16 or float32).
      temperature: scalar ``tau`` (the one the statistics' log-partition was computed at).
      stats: the teacher's :class:`TeacherStats` (``[...]`` each), or None (module doc).
      standardize: logit standardization of both models (full-vocabulary statistics).
      tail: ``"bucket"`` or ``"renormalize"``.
      where: optional boolean ``[...]`` mask; the mean is over True tokens (0 if none).
      row_axis, vocab_axis: mesh axis names of the sharded form; ``mesh``: the mesh (default:
        the one in context).

    Returns:
      Scalar float32; gradients flow into ``student_logits`` (and a traced ``temperature``).

    >>> import jax, jax.numpy as jnp
    >>> t = jax.random.normal(jax.random.key(0), (3, 8)); s = jax.random.normal(jax.random.key(1), (3, 8))
    >>> idx, top, st = teacher_top_k(t, 8, 2.0, standardize=True)
    >>> from zkd_jax import kd_loss
    >>> bool(abs(topk_kd_loss(s, idx, top, 2.0, stats=st, standardize=True)
    ...          - kd_loss(s, t, 2.0, standardize=True)) < 1e-5)
    True
    """
    s = jnp.asarray(student_logits)
    idx, top = jnp.asarray(top_indices), jnp.asarray(top_logits)
    lead, vocab = s.shape[:-1], s.shape[-1]
    _check(lead, vocab, idx, top, stats, tail)
    n, k = max(1, math.prod(lead)), idx.shape[-1]
    tau = jnp.asarray(temperature, jnp.float32)
    args = (s.reshape(n, vocab), idx.reshape(n, k).astype(jnp.int32), top.reshape(n, k),
            _flat_stats(stats, n), row_weights(lead, where, jnp.float32))

    def local(s, idx, top, st, w):
        offset = lax.axis_index(vocab_axis) * s.shape[1] if vocab_axis else 0
        rows = _rows_loss(s, offset, vocab, idx, top, st, tau, standardize, tail, vocab_axis)
        total = jnp.sum(jnp.where(w != 0, w * rows, 0.0))
        return lax.psum(total, row_axis) if row_axis else total

    if row_axis is None and vocab_axis is None:
        return local(*args)
    sizes = dict((mesh or jax.sharding.get_abstract_mesh()).shape)
    for axis, count, what in ((row_axis, n, "tokens"), (vocab_axis, vocab, "vocabulary entries")):
        if axis is not None and (axis not in sizes or count % sizes[axis]):
            raise ValueError(f"{what} ({count}) must split evenly over mesh axis {axis!r} (mesh axes "
                             f"{sizes}); set the mesh with jax.set_mesh(mesh) or pass mesh=")
    rows_spec = P(row_axis)
    specs = (P(row_axis, vocab_axis), P(row_axis, None), P(row_axis, None),
             None if stats is None else TeacherStats(rows_spec, rows_spec, rows_spec), rows_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)


def topk_kd_loss_from_hidden(
    student_hidden: Array,
    student_head: Array,
    top_indices: Array,
    top_logits: Array,
    temperature: float | Array,
    *,
    stats: TeacherStats | None = None,
    standardize: bool = False,
    tail: str = "bucket",
    where: Array | None = None,
    chunk_size: int | None = None,
    student_bias: Array | None = None,
    labels: Array | None = None,
    ce_weight: float = 0.0,
) -> Array:
    """:func:`topk_kd_loss` of ``h W + b`` (+ ``ce_weight`` times the next-token cross-entropy).

    The logits are formed ``chunk_size`` rows at a time inside a ``lax.scan`` whose body is
    rematerialized (``jax.checkpoint``): the backward pass recomputes each chunk's ``[chunk, V]``
    logits, so no ``[N, V]`` array is ever held. ``chunk_size`` None: automatic (as
    :func:`zkd_jax.kd_loss_from_hidden`). Row count not divisible by the chunk: the last chunk is
    padded with zero-weight rows.

    Args:
      student_hidden: ``[..., H]``; student_head: ``[H, V]``; student_bias: optional ``[V]``.
      labels: integer ``[...]`` targets, needed when ``ce_weight`` is not 0.
      The others as :func:`topk_kd_loss`.
    """
    h, w_head = jnp.asarray(student_hidden), jnp.asarray(student_head)
    idx, top = jnp.asarray(top_indices), jnp.asarray(top_logits)
    lead, vocab = h.shape[:-1], w_head.shape[-1]
    if w_head.ndim != 2 or w_head.shape[0] != h.shape[-1]:
        raise ValueError(f"student_head must be [H, V] with H = {h.shape[-1]}, got {w_head.shape}")
    _check(lead, vocab, idx, top, stats, tail)
    if labels is None and ce_weight != 0:
        raise ValueError("ce_weight is not 0: pass labels=[...] (integer next-token targets)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    n, k = max(1, math.prod(lead)), idx.shape[-1]
    rows = min(chunk_size or default_chunk_rows(vocab, n), n)
    chunks = -(-n // rows)
    pad = chunks * rows - n
    tau = jnp.asarray(temperature, jnp.float32)
    y = jnp.zeros(lead, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    st = _flat_stats(stats, n)
    flat = (h.reshape(n, -1), idx.reshape(n, k).astype(jnp.int32), top.reshape(n, k),
            y.reshape(n), row_weights(lead, where, jnp.float32), st)
    padded = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), flat)
    per_chunk = jax.tree.map(lambda a: a.reshape((chunks, rows) + a.shape[1:]), padded)

    @jax.checkpoint
    def chunk_sum(w_head, bias, chunk):
        hc, ic, tc, yc, wc, sc = chunk
        logits = jnp.dot(hc, w_head, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        per_row = _rows_loss(logits, 0, vocab, ic, tc, sc, tau, standardize, tail, None)
        if labels is not None:
            ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, yc[:, None], -1)[:, 0]
            per_row = per_row + ce_weight * ce
        return jnp.sum(jnp.where(wc != 0, wc * per_row, 0.0))

    def step(total, chunk):
        return total + chunk_sum(w_head, student_bias, chunk), None

    return lax.scan(step, jnp.zeros((), jnp.float32), per_chunk)[0]

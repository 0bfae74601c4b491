"""Per-row statistics and the logits' gradient of the KD(+LS, +CE) loss over a vocabulary that may
be sharded over a mesh axis and padded to 128 lanes; the chunk loops' slicing and scans.

The building blocks of :mod:`zkd_jax.chunked_kd`. One block of logits is ``[rows, width]``: the
``local`` columns this device holds (all ``V``, or ``V / shards`` of a vocabulary sharded over
the mesh axis ``Vocab.axis``), padded with zero columns to ``width``, a multiple of 128 (the
TPU's lanes). Padded columns (and, where ``V`` did not divide by the shards, the padding of the
last shard) are excluded from every reduction: the mean, the standard deviation and the
softmaxes are those of the ``V`` real columns. A reduction over the vocabulary is a local sum
(or max) followed by ``psum`` (``pmax``) over ``Vocab.axis``: no device ever holds another's
columns.

:func:`row_stats` computes, per row: the loss terms (``tau^2 KL``; the cross-entropy
``lse(s) - s_y``), ``mean``, ``sigma``, ``sigma + eps`` of both logits, ``lse(Z / tau)`` of both,
``r = sum_v (p_s - p_t) Z(s)`` and, when the temperature is differentiated, ``d(tau^2 KL)/d tau``
in the cancellation-free form of :mod:`zkd_jax.tempered_kl`. :func:`logits_grad` turns those into
the gradient of any block of columns, with ``c_i`` the row's cotangent::

    g_z = c tau (p_s - p_t)
    g_s = g_z / (sigma + eps) - c tau r (s - mean) / ((sigma + eps) (V - 1) sigma)   (standardized)
        + c ce_weight (softmax(s) - onehot(y))

(the second term is 0 where ``sigma = 0``, the safe-sqrt convention of ``standardize``).

16-bit arrays are sliced through a uint16 view when the program is lowered for XLA:CPU
(``lax.platform_dependent``: the platform compiled for, not the process's backend), natively
elsewhere. Only JAX is imported (and :mod:`zkd_jax.tempered_kl`'s quadrature).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from zkd_jax.tempered_kl import _NODES, _WEIGHTS, QUAD_MAX_KAPPA

Array = jax.Array
EPS = 1e-7
LANES = 128


def lanes(n: int) -> int:
    """``n`` rounded up to a multiple of 128."""
    return -(-n // LANES) * LANES


class Vocab(NamedTuple):
    """The vocabulary as one device sees it: ``size`` real classes (``V``), ``local`` columns held
    here (``V`` or the shard's; ``local * shards >= V``), padded to ``width`` columns in a block;
    ``axis`` the mesh axis the columns are sharded over (None: not sharded)."""

    size: int
    local: int
    width: int
    axis: str | None = None

    def offset(self) -> Array | int:
        """Global index of this device's first column."""
        return 0 if self.axis is None else lax.axis_index(self.axis) * self.local

    def valid(self, start=0, cols: int | None = None) -> Array | None:
        """``[cols]`` bool: real columns among local ``start .. start + cols`` (None: all real)."""
        cols = self.width if cols is None else cols
        shards = 1 if self.axis is None else lax.axis_size(self.axis)
        padded = self.width > self.local or self.local * shards > self.size
        if not padded:
            return None
        j = start + jnp.arange(cols)
        return (j < self.local) & (self.offset() + j < self.size)


def _sum(x: Array, vocab: Vocab, valid: Array | None) -> Array:
    s = jnp.sum(x if valid is None else jnp.where(valid, x, 0.0), axis=-1)
    return s if vocab.axis is None else lax.psum(s, vocab.axis)


def _max(x: Array, vocab: Vocab, valid: Array | None) -> Array:
    m = jnp.max(x if valid is None else jnp.where(valid, x, -jnp.inf), axis=-1)
    return m if vocab.axis is None else lax.pmax(m, vocab.axis)


def _lse(x: Array, vocab: Vocab, valid: Array | None) -> Array:
    """``log sum_v exp(x_v)`` over the real columns of the whole vocabulary."""
    m = _max(x, vocab, valid)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(_sum(jnp.exp(x - m[:, None]), vocab, valid))


def _zscore(x, vocab, valid):
    mean = _sum(x, vocab, valid) / vocab.size
    centered = x - mean[:, None]
    var = _sum(centered * centered, vocab, valid) / max(vocab.size - 1, 1)
    positive = var > 0
    sigma = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return centered / (sigma + EPS)[:, None], mean, sigma, sigma + EPS


def _dh_dtau(a, b, tau, p_t, p_s, kl, vocab, valid):
    """``d(tau^2 KL)/d tau`` per row: the path form where the spread allows, else the direct one."""
    total = lambda x: _sum(x, vocab, valid)  # noqa: E731
    d = a - b
    e_a, e_d = total(p_t * a), total(p_t * d)
    cov = total(p_t * (a - e_a[:, None]) * (d - e_d[:, None]))
    direct = 2.0 * tau * kl - cov / tau + total((p_t - p_s) * b)

    def add_node(acc, node):
        v, w = node
        c = b + v * d
        p = jnp.exp(c / tau - _lse(c / tau, vocab, valid)[:, None])
        d_c, c_c = d - total(p * d)[:, None], c - total(p * c)[:, None]
        return acc + (w * v) * total(p * d_c * d_c * c_c)

    nodes = (jnp.asarray(_NODES, a.dtype), jnp.asarray(_WEIGHTS, a.dtype))
    path = -scan(lambda acc, i: add_node(acc, (nodes[0][i], nodes[1][i])), jnp.zeros_like(kl),
                 len(_NODES)) / tau**2
    spread = _max(d, vocab, valid) + _max(-d, vocab, valid)
    return jnp.where(spread <= QUAD_MAX_KAPPA * jnp.abs(tau), path, direct)


def row_stats(s: Array, t: Array, tau: Array, vocab: Vocab, valid: Array | None, standardize: bool,
              want_dtau: bool = False, labels: Array | None = None) -> dict[str, Array]:
    """Per-row statistics of one block of rows (all columns of this device). ``s, t``:
    ``[rows, width]`` in the compute dtype; ``labels``: ``[rows]`` global class indices."""
    if standardize:
        zs, mean_s, sig_s, den_s = _zscore(s, vocab, valid)
        zt, mean_t, _, den_t = _zscore(t, vocab, valid)
        out = {"mean_s": mean_s, "sig_s": sig_s, "den_s": den_s, "mean_t": mean_t, "den_t": den_t}
    else:
        zs, zt, out = s, t, {}
    out["lse_zs"], out["lse_zt"] = _lse(zs / tau, vocab, valid), _lse(zt / tau, vocab, valid)
    log_ps, log_pt = zs / tau - out["lse_zs"][:, None], zt / tau - out["lse_zt"][:, None]
    p_s, p_t = jnp.exp(log_ps), jnp.exp(log_pt)
    kl = _sum(jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0), vocab, valid)
    out["kd"] = tau**2 * kl
    if standardize:
        out["r"] = _sum((p_s - p_t) * zs, vocab, valid)
    if labels is not None:
        out["lse_s"] = _lse(s, vocab, valid)
        hit = vocab.offset() + jnp.arange(s.shape[1])[None, :] == labels[:, None]
        out["ce"] = out["lse_s"] - _sum(jnp.where(hit, s, 0.0), vocab, valid)
    if want_dtau:
        out["dtau"] = _dh_dtau(zt, zs, tau, p_t, p_s, kl, vocab, valid)
    return out


def logits_grad(s: Array, t: Array, st: dict[str, Array], c: Array, tau: Array, vocab: Vocab,
                valid: Array | None, start=0, ce_weight: Array | None = None,
                labels: Array | None = None) -> Array:
    """The loss's gradient in the student logits ``s [rows, cols]`` (columns ``start ..`` of this
    device's), from the rows' statistics ``st`` and cotangents ``c [rows]`` (module doc)."""
    col = lambda x: x[:, None]  # noqa: E731
    standardize = "mean_s" in st
    zs = (s - col(st["mean_s"])) / col(st["den_s"]) if standardize else s
    zt = (t - col(st["mean_t"])) / col(st["den_t"]) if standardize else t
    g = col(c * tau) * (jnp.exp(zs / tau - col(st["lse_zs"])) - jnp.exp(zt / tau - col(st["lse_zt"])))
    if standardize:
        sig = st["sig_s"]
        safe = jnp.where(sig > 0, sig, 1.0)
        k = jnp.where(sig > 0, c * tau * st["r"] / (st["den_s"] * max(vocab.size - 1, 1) * safe), 0.0)
        g = g / col(st["den_s"]) - col(k) * (s - col(st["mean_s"]))
    if labels is not None:
        onehot = col(labels) == vocab.offset() + start + jnp.arange(s.shape[1])[None, :]
        g = g + col(c * ce_weight) * (jnp.exp(s - col(st["lse_s"])) - onehot)
    g = jnp.where(col(c != 0), g, 0.0)
    return g if valid is None else jnp.where(valid, g, 0.0)


# ----------------------------------------------------------------------------- loops and slices


def vma(x) -> frozenset:
    """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def vary(x: Array, axes) -> Array:
    """``x`` marked as varying over ``axes`` too (a no-op at run time)."""
    missing = tuple(sorted(frozenset(axes) - vma(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def fit(ct: Array | None, primal) -> Array | None:
    """A cotangent brought to its primal's variance: summed over the mesh axes along which the
    primal is the same value (each device's contribution is a part of the total), marked varying
    where the primal varies."""
    if ct is None or primal is None:
        return ct
    extra = tuple(sorted(vma(ct) - vma(primal)))
    return vary(lax.psum(ct, extra) if extra else ct, vma(primal))


def stat_names(standardize: bool) -> list[str]:
    """The per-row statistics :func:`logits_grad` needs."""
    standardized = ["mean_s", "sig_s", "den_s", "mean_t", "den_t", "r"]
    return ["lse_zs", "lse_zt"] + (standardized if standardize else [])


def fit_all(cts, primals) -> tuple:
    """:func:`fit` of each cotangent to its primal."""
    return tuple(fit(ct, p) for ct, p in zip(cts, primals))


def keep_stats(stats: dict, st: dict, start) -> dict:
    """The ``[N]`` statistics ``stats`` with a chunk's ``st`` written at row ``start``."""
    return {k: lax.dynamic_update_slice_in_dim(stats[k], st[k], start, 0) for k in stats}


def weighted(total: Array, w: Array, per_row: Array) -> Array:
    """``total + sum_i w_i per_row_i`` over rows with ``w_i != 0`` (others may be non-finite)."""
    return total + jnp.sum(jnp.where(w != 0, w * per_row, 0.0))


def scan(body: Callable, init, length: int):
    """``lax.scan`` of ``carry = body(carry, i)`` for ``i < length``; the initial carry is first
    made to vary over the mesh axes the body's output does (``shard_map`` with ``check_vma``)."""
    for _ in range(4):
        out = jax.eval_shape(body, init, 0)
        axes = jax.tree.map(lambda o: getattr(getattr(o, "manual_axis_type", None), "varying", ()), out)
        new = jax.tree.map(vary, init, axes)
        if all(vma(a) == vma(b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(init))):
            break
        init = new
    return lax.scan(lambda c, i: (body(c, i), None), init, jnp.arange(length))[0]


def scan_chunks(n: int, size: int, body: Callable, init):
    """``carry = body(carry, start, size)`` over ``n // size`` chunks (a :func:`scan`), then once
    more with a static ``start`` and ``rows = n % size`` if that is not 0: no padding copy."""
    full, rest = divmod(n, size)
    carry = scan(lambda c, i: body(c, i * size, size), init, full) if full else init
    return body(carry, full * size, rest) if rest else carry


def _bits_or_native(fn: Callable, x: Array, *more: Array) -> Array:
    """``fn`` on ``x`` (and ``more``, same dtype); for 16-bit floats lowered for XLA:CPU, on their
    uint16 view: XLA:CPU converts the whole operand of a bf16/f16 dynamic-slice to float32 and
    hoists that copy out of the loop. Other platforms (TPU, GPU) slice 16-bit floats natively."""
    if not (x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)):
        return fn(x, *more)

    def as_bits(*a):
        out = fn(*(lax.bitcast_convert_type(y, jnp.uint16) for y in a))
        return lax.bitcast_convert_type(out, x.dtype)

    return lax.platform_dependent(x, *more, cpu=as_bits, default=fn)


def take(x: Array, start, size: int, axis: int = 0) -> Array:
    """``size`` entries of ``x`` along ``axis`` from ``start``."""
    return _bits_or_native(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=axis), x)


def put(x: Array, update: Array, start, axis: int = 0) -> Array:
    """``x`` with ``update`` (cast to ``x.dtype``) written at ``start`` along ``axis``."""
    return _bits_or_native(lambda a, u: lax.dynamic_update_slice_in_dim(a, u, start, axis=axis),
                           x, update.astype(x.dtype))


def pad_cols(x: Array, width: int) -> Array:
    """``x [rows, c]`` with zero columns up to ``width``."""
    return x if x.shape[1] == width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))

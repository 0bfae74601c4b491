"""Tunix's ``LogitStrategy`` with logit standardization: :class:`StandardizedLogitStrategy`.

`Tunix <https://github.com/google/tunix>`_ (``pip install 'zkd_jax[tunix]'``) distils language
models with ``DistillationTrainer(student, teacher, strategy, optimizer, config)``. This strategy
is a subclass of ``tunix.distillation.strategies.LogitStrategy``: the same constructor (plus
keyword-only ``standardize``, ``chunk_size``, ``token_mean``, ``top_k_tail``), attributes
(``temperature``, ``alpha``, ``distill_top_k``), validation, metrics (``distill/soft_loss``,
``distill/hard_loss``, ``distill/kl_div``, ``distill/teacher_loss``) and labels. Its loss is

    ``loss = alpha * tau^2 KL(softmax(Z(t) / tau) || softmax(Z(s) / tau)) + (1 - alpha) * CE(s, y)``

with ``Z`` the z-score over the vocabulary (:func:`zkd_jax.losses.standardize`) when
``standardize=True`` and the identity otherwise; ``distill/soft_loss`` is the first term without
``alpha`` (:func:`zkd_jax.kd_loss`), ``distill/kl_div`` is it divided by ``tau^2``,
``distill/hard_loss`` the cross-entropy, ``distill/teacher_loss`` the teacher's cross-entropy.

Labels (what ``labels_fn`` returns): Tunix's one-hot (or soft) float targets ``[..., V]``, times the
padding mask (a padded position's row is all zeros); or integer ids ``[...]``; or a pair
``(ids or one-hot, mask)``. The cross-entropy is ``-sum_v y_v log softmax(s)_v`` (0 at a padded
position).

Means over positions (``token_mean``): ``"all"`` (default) is Tunix's: both terms are averaged
over *all* positions of the batch, padded ones included (the KL of a padded position counts, its
cross-entropy is 0). ``"valid"`` averages both over the valid tokens only (the mask, or the
positions whose label row is not all zero): the number a per-token loss means; it differs from
Tunix's whenever there is padding.

``distill_top_k = k > 0``: the KL over the teacher's ``k`` largest logits, both distributions
renormalized over them (Tunix's; ``top_k_tail="renormalize"``) or with the rest as one bucket
(``"bucket"``), via :func:`zkd_jax.topk_kd.topk_kd_loss`; with ``standardize=True`` the z-scores
use the full vocabulary's mean and standard deviation (the teacher's logits are all there).

With ``standardize=False`` (and ``token_mean="all"``) the loss and metrics are Tunix's
``LogitStrategy``'s, number for number (float32 rounding). Tunix is imported on first access of
:class:`StandardizedLogitStrategy` (a module ``__getattr__``), never by ``import zkd_jax``;
:func:`logit_objective`, the math, needs JAX only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from zkd_jax.losses import kd_loss
from zkd_jax.topk_kd import TAILS, teacher_stats, topk_kd_loss

Array = jax.Array
TOKEN_MEANS = ("all", "valid")

__all__ = ["StandardizedLogitStrategy", "logit_objective", "parse_labels", "task_loss"]


def parse_labels(labels: Any, logits_shape: tuple[int, ...]) -> tuple[Array, Array | None]:
    """``(targets, mask)``: float ``[..., V]`` targets (ids become one-hot) and a bool ``[...]`` mask.

    ``mask`` is None when neither a mask was passed nor could be read from zero label rows (ids
    without a mask: every position is valid). Float targets without a mask: a position whose row
    sums to 0 (one-hot times the padding mask) is padding.
    """
    mask = None
    if isinstance(labels, (tuple, list)) and len(labels) == 2:
        labels, mask = labels
        mask = jnp.asarray(mask) > 0
    labels = jnp.asarray(labels)
    vocab = logits_shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == tuple(logits_shape[:-1]):
        targets = jax.nn.one_hot(labels, vocab, dtype=jnp.float32)
    elif jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == tuple(logits_shape):
        targets = labels.astype(jnp.float32)
        if mask is None:
            mask = jnp.sum(targets, axis=-1) != 0
    else:
        raise ValueError(
            f"labels_fn must return one-hot float labels {tuple(logits_shape)} (times the padding "
            f"mask), integer token ids {tuple(logits_shape[:-1])}, or a pair (labels, mask); got "
            f"{labels.dtype} {labels.shape}")
    if mask is not None:
        mask = jnp.broadcast_to(mask, logits_shape[:-1])
        targets = targets * mask[..., None]
    return targets, mask


def _mean(values: Array, mask: Array | None, token_mean: str) -> Array:
    if token_mean == "all" or mask is None:
        return jnp.mean(values)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def task_loss(logits: Array, labels: Any, *, token_mean: str = "all") -> Array:
    """Mean ``-sum_v y_v log softmax(logits)_v`` (Tunix's task loss; ``token_mean`` as the module)."""
    logits = jnp.asarray(logits, jnp.float32)
    targets, mask = parse_labels(labels, logits.shape)
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return _mean(ce, mask, token_mean)


def logit_objective(
    student_logits: Array,
    teacher_logits: Array,
    labels: Any,
    *,
    temperature: float,
    alpha: float,
    standardize: bool = True,
    distill_top_k: int = 0,
    token_mean: str = "all",
    top_k_tail: str = "renormalize",
    chunk_size: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``(alpha * soft + (1 - alpha) * hard, metrics)``: the strategy's loss (module doc), JAX only.

    Args:
      student_logits, teacher_logits: ``[..., V]`` (any float dtype; computed in float32).
      labels: see :func:`parse_labels`.
      temperature, alpha: the KD temperature and the weight of the KD term.
      standardize: logit standardization of both models (the KD term only).
      distill_top_k: 0 for the full vocabulary, else the teacher's top-k.
      token_mean: ``"all"`` (Tunix's) or ``"valid"``.
      top_k_tail: ``"renormalize"`` (Tunix's) or ``"bucket"``.
      chunk_size: rows per chunk of :func:`zkd_jax.kd_loss` (None: automatic).
    """
    s = jnp.asarray(student_logits, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    if s.ndim == 1:
        s, t = s[None], t[None]
        labels = jax.tree.map(lambda x: jnp.asarray(x)[None], labels)
    _, mask = parse_labels(labels, s.shape)
    where = mask if token_mean == "valid" else None
    if distill_top_k > 0:
        top, idx = jax.lax.top_k(t, distill_top_k)
        # Tunix's own top-k (no standardization, renormalized) needs no statistics
        exact = standardize or top_k_tail == "bucket"
        stats = teacher_stats(t, temperature, standardize=standardize) if exact else None
        soft = topk_kd_loss(s, idx, top, temperature, stats=stats, standardize=standardize,
                            tail=top_k_tail, where=where)
    else:
        soft = kd_loss(s, t, temperature, standardize=standardize, where=where, chunk_size=chunk_size)
    hard = task_loss(s, labels, token_mean=token_mean)
    teacher = task_loss(t, labels, token_mean=token_mean)
    metrics = {"distill/soft_loss": soft, "distill/hard_loss": hard,
               "distill/kl_div": soft / temperature**2, "distill/teacher_loss": teacher}
    return alpha * soft + (1.0 - alpha) * hard, metrics


def _check_options(distill_top_k, token_mean, top_k_tail, chunk_size) -> None:
    if not isinstance(distill_top_k, int) or distill_top_k < 0:
        raise ValueError(f"distill_top_k must be an int >= 0 (0: the full vocabulary), got {distill_top_k!r}")
    if token_mean not in TOKEN_MEANS:
        raise ValueError(f"token_mean must be one of {TOKEN_MEANS}, got {token_mean!r}")
    if top_k_tail not in TAILS:
        raise ValueError(f"top_k_tail must be one of {TAILS}, got {top_k_tail!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def _make_class():
    try:
        from tunix.distillation.strategies import logit  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("StandardizedLogitStrategy needs google-tunix: pip install 'zkd_jax[tunix]'") from e

    class StandardizedLogitStrategy(logit.LogitStrategy):
        """Tunix's ``LogitStrategy`` with logit standardization (:mod:`zkd_jax.integrations.tunix`).

        Args (after Tunix's ``student_forward_fn, teacher_forward_fn, labels_fn, temperature=2.0,
        alpha=0.5, distill_top_k=0``):
          standardize: z-score both models' logits in the KD term (default True).
          chunk_size: rows per chunk of the bounded-memory KD (None: automatic).
          token_mean: ``"all"`` (Tunix's mean over every position) or ``"valid"``.
          top_k_tail: with ``distill_top_k``: ``"renormalize"`` (Tunix's) or ``"bucket"``.
        """

        def __init__(self, student_forward_fn, teacher_forward_fn, labels_fn, temperature: float = 2.0,
                     alpha: float = 0.5, distill_top_k: int = 0, *, standardize: bool = True,
                     chunk_size: int | None = None, token_mean: str = "all",
                     top_k_tail: str = "renormalize"):
            super().__init__(student_forward_fn, teacher_forward_fn, labels_fn, temperature=temperature,
                             alpha=alpha, distill_top_k=distill_top_k)
            _check_options(distill_top_k, token_mean, top_k_tail, chunk_size)
            self.standardize = bool(standardize)
            self.chunk_size = chunk_size
            self.token_mean = token_mean
            self.top_k_tail = top_k_tail

        def compute_loss(self, student_output, teacher_output, labels):
            return logit_objective(
                student_output, teacher_output, labels, temperature=self.temperature,
                alpha=self.alpha, standardize=self.standardize, distill_top_k=self.distill_top_k,
                token_mean=self.token_mean, top_k_tail=self.top_k_tail, chunk_size=self.chunk_size)

        def compute_eval_loss(self, student_output, labels):
            s = jnp.asarray(student_output, jnp.float32)
            if s.ndim == 1:
                s, labels = s[None], jax.tree.map(lambda x: jnp.asarray(x)[None], labels)
            return task_loss(s, labels, token_mean=self.token_mean), {}

    StandardizedLogitStrategy.__module__ = __name__
    return StandardizedLogitStrategy


def __getattr__(name: str):
    if name == "StandardizedLogitStrategy":
        cls = _make_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

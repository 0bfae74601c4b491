"""Logit-standardized KD with token masks as a Tunix distillation strategy (``zkd_jax[tunix]``).

`Tunix <https://github.com/google/tunix>`_ (``pip install google-tunix``) trains language models
with ``tunix.distillation.DistillationTrainer(student, teacher, strategy, optimizer, config)``; a
strategy turns the two models' outputs and the labels into ``(loss, metrics)``. Tunix's own
``LogitStrategy`` has neither logit standardization nor padding masks. The strategy built by
:func:`standardized_logit_strategy` computes, with ``Z`` the z-score over the vocabulary,

    ``loss = alpha * tau^2 KL(softmax(Z(t) / tau) || softmax(Z(s) / tau)) + (1 - alpha) * CE(s, y)``

averaged over the tokens where the mask is True (:func:`zkd_jax.kd_loss` with ``where=``,
:func:`zkd_jax.cross_entropy`), i.e. Tunix's ``LogitStrategy`` formula with ``Z`` and masks.
Tunix is imported only inside :func:`standardized_logit_strategy`; :func:`masked_kd_objective`, the
math, needs JAX only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from zkd_jax.losses import cross_entropy, kd_loss

Array = jax.Array

__all__ = ["masked_kd_objective", "split_labels", "standardized_logit_strategy"]


def split_labels(labels: Any) -> tuple[Array, Array | None]:
    """``labels_fn``'s output as ``(targets, mask)``: integer ``[...]`` targets, optional bool ``[...]``.

    ``labels_fn`` returns either the integer next-token targets or a pair ``(targets, mask)``.
    """
    mask = None
    if isinstance(labels, (tuple, list)) and len(labels) == 2:
        labels, mask = labels
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            "labels_fn must return integer token ids [...] or a pair (token ids, bool mask [...]); "
            f"got dtype {labels.dtype} (one-hot labels are not accepted: pass their argmax)")
    return labels, None if mask is None else jnp.asarray(mask, bool)


def masked_kd_objective(
    student_logits: Array,
    teacher_logits: Array,
    labels: Any,
    *,
    temperature: float,
    alpha: float,
    standardize: bool = True,
    chunk_size: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``alpha * KD + (1 - alpha) * CE`` over the masked tokens, and its parts as metrics.

    Args:
      student_logits, teacher_logits: ``[..., V]`` (e.g. ``[batch, seq, vocab]``).
      labels: integer targets ``[...]`` or ``(targets, mask)`` (see :func:`split_labels`).
      temperature: KD temperature ``tau > 0``.
      alpha: weight of the KD term, in ``[0, 1]``.
      standardize: logit standardization of both models' logits (the KD term only).
      chunk_size: rows per chunk of :func:`zkd_jax.kd_loss` (None: automatic).

    Returns:
      ``(loss, {"distill/soft_loss": KD, "distill/hard_loss": CE})``, scalars (float32).
    """
    targets, mask = split_labels(labels)
    kd = kd_loss(student_logits, teacher_logits, temperature, standardize=standardize,
                 where=mask, chunk_size=chunk_size)
    ce = cross_entropy(student_logits, targets, where=mask)
    return alpha * kd + (1.0 - alpha) * ce, {"distill/soft_loss": kd, "distill/hard_loss": ce}


def standardized_logit_strategy(
    student_forward_fn: Callable[..., Array],
    teacher_forward_fn: Callable[..., Array],
    labels_fn: Callable[..., Any],
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    standardize: bool = True,
    chunk_size: int | None = None,
):
    """A ``tunix.distillation.strategies.BaseStrategy`` whose loss is :func:`masked_kd_objective`.

    Args:
      student_forward_fn, teacher_forward_fn: ``fn(model, **inputs) -> logits [..., V]`` (Tunix's
        convention; the inputs are the trainer's, ``input_tokens`` and ``input_mask`` by default).
      labels_fn: ``fn(**inputs) -> targets`` or ``(targets, mask)``, e.g. for next-token
        prediction ``lambda input_tokens, input_mask: (input_tokens[:, 1:], input_mask[:, 1:])``
        with forward functions returning ``logits[:, :-1]``.
      temperature, alpha, standardize, chunk_size: as :func:`masked_kd_objective`.

    Raises:
      ImportError: Tunix is not installed (``pip install 'zkd_jax[tunix]'``).
      ValueError: ``temperature <= 0`` or ``alpha`` outside ``[0, 1]``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    try:
        from tunix.distillation.strategies import base_strategy
    except ImportError as e:
        raise ImportError("the Tunix strategy needs google-tunix: pip install 'zkd_jax[tunix]'") from e
    settings = {"temperature": float(temperature), "alpha": float(alpha),
                "standardize": standardize, "chunk_size": chunk_size}

    class LogitStandardizationStrategy(base_strategy.BaseStrategy):
        """Tunix's logit distillation with logit standardization and token masks (zkd_jax)."""

        def compute_loss(self, student_output, teacher_output, labels):
            return masked_kd_objective(student_output, teacher_output, labels, **settings)

        def compute_eval_loss(self, student_output, labels):
            targets, mask = split_labels(labels)
            return cross_entropy(student_output, targets, where=mask), {}

    return LogitStandardizationStrategy(student_forward_fn, teacher_forward_fn, labels_fn)

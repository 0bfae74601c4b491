"""Argument checks of the public loss functions (``zkd_jax.losses``), one ``ValueError`` each.

What is checked and when:

* shapes and dtypes are static, so they are checked always, eagerly and while ``jax.jit`` traces:
  student and teacher logits of the same shape ``[..., C]`` (no silent broadcasting of a
  ``(1, C)`` teacher), at least one row (an empty batch would give NaN), ``C >= 1``; integer
  ``labels`` of shape ``[...]`` (the logits' leading axes); ``where`` boolean of shape ``[...]``;
* values are checked only when they are concrete (eager calls, Python numbers): a temperature
  must be finite and > 0, labels must lie in ``[0, C)``. Under ``jit`` a traced temperature or
  traced labels are not inspected: a temperature <= 0 then gives a meaningless loss (and NaN
  gradients), cross-entropy reads a label -1 as class ``C - 1`` and gives NaN for a label >= C,
  and DKD's one-hot of an out-of-range label is all zero. Check such values before the jitted call
  (the trainer validates its config, ``zkd_jax.trainer.validate``, and the labels come from the
  data pipeline).

Imports only JAX and NumPy (the math modules' rule).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_labels", "check_logits", "check_pair", "check_temperature", "check_where"]


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_logits(name: str, logits: Any) -> None:
    """``logits`` is ``[..., C]`` with ``C >= 1`` and at least one row."""
    shape = _shape(logits)
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., C] with C >= 1 classes, got {shape}.")
    if len(shape) > 1 and math.prod(shape[:-1]) == 0:
        raise ValueError(f"{name} has no rows (shape {shape}): the loss of an empty batch is "
                         "undefined; skip the call or pass at least one row.")


def check_pair(student_logits: Any, teacher_logits: Any, *, student: str = "student_logits",
               teacher: str = "teacher_logits") -> None:
    """Both logits valid and of the same shape."""
    check_logits(student, student_logits)
    check_logits(teacher, teacher_logits)
    s, t = _shape(student_logits), _shape(teacher_logits)
    if s != t:
        raise ValueError(f"{teacher} has shape {t} but {student} has shape {s}; they must be "
                         "equal (one teacher row per student row, no broadcasting).")


def check_temperature(temperature: Any, name: str = "temperature") -> None:
    """A Python number or concrete scalar must be finite and > 0; a traced one is not checked."""
    if isinstance(temperature, bool):
        raise ValueError(f"{name} must be a number > 0, got {temperature!r}.")
    if isinstance(temperature, (int, float)) or (_concrete(temperature)
                                                 and np.ndim(temperature) == 0):
        value = float(np.asarray(temperature))
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value} must be finite and > 0 (e.g. 4.0).")
    elif np.ndim(temperature) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {_shape(temperature)}.")


def check_labels(labels: Any, logits: Any, name: str = "labels") -> None:
    """Integer labels of the logits' leading shape; concrete ones in ``[0, C)``."""
    shape, lead = _shape(labels), _shape(logits)[:-1]
    dtype = jnp.asarray(labels).dtype if _concrete(labels) else labels.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {dtype}.")
    if shape != lead:
        raise ValueError(f"{name} has shape {shape} but the logits' leading axes are {lead}; "
                         "pass one label per row.")
    if _concrete(labels) and shape and math.prod(shape):
        values = np.asarray(labels)
        low, high, classes = int(values.min()), int(values.max()), _shape(logits)[-1]
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds {bad}, outside [0, {classes}) for {classes} classes; "
                             "labels must be class indices 0..C-1.")


def check_where(where: Any, logits: Any, name: str = "where") -> None:
    """None, or a boolean mask of the logits' leading shape."""
    if where is None:
        return
    dtype = jnp.asarray(where).dtype if _concrete(where) else where.dtype
    if dtype != jnp.bool_:
        raise ValueError(f"{name} must be a boolean mask, got dtype {dtype}; pass e.g. "
                         "mask.astype(bool).")
    shape, lead = _shape(where), _shape(logits)[:-1]
    if shape != lead:
        raise ValueError(f"{name} has shape {shape} but the logits' leading axes are {lead}; "
                         "pass one flag per row.")


def check_kd_args(student_logits, teacher_logits, temperature, where) -> None:
    """:func:`zkd_jax.losses.kd_loss`'s arguments."""
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    check_where(where, student_logits)


def check_dkd_args(student_logits, teacher_logits, labels, temperature, where) -> None:
    """:func:`zkd_jax.losses.dkd_loss`'s arguments."""
    check_kd_args(student_logits, teacher_logits, temperature, where)
    check_labels(labels, student_logits)


def check_ce_args(logits, labels, where) -> None:
    """:func:`zkd_jax.losses.cross_entropy`'s arguments."""
    check_logits("logits", logits)
    check_labels(labels, logits)
    check_where(where, logits)


def check_mlkd_args(student_weak, student_strong, teacher_weak, teacher_strong, labels,
                    temperature) -> None:
    """:func:`zkd_jax.losses.mlkd_loss`'s arguments (all four logits ``[B, C]``)."""
    check_pair(student_weak, teacher_weak, student="student_weak", teacher="teacher_weak")
    check_pair(student_weak, student_strong, student="student_weak", teacher="student_strong")
    check_pair(student_weak, teacher_strong, student="student_weak", teacher="teacher_strong")
    check_labels(labels, student_weak)
    check_temperature(temperature)

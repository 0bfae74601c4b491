"""The earlier name of :mod:`zkd_jax.integrations.tunix`, kept for code that imports it.

:func:`standardized_logit_strategy` builds a :class:`~zkd_jax.integrations.tunix.StandardizedLogitStrategy`
averaging over the valid tokens only (``token_mean="valid"``, what this factory always did);
:func:`masked_kd_objective` is its loss (JAX only). New code: use the class.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from zkd_jax.integrations.tunix import logit_objective

__all__ = ["masked_kd_objective", "standardized_logit_strategy"]


def masked_kd_objective(student_logits: jax.Array, teacher_logits: jax.Array, labels: Any, *,
                        temperature: float, alpha: float, standardize: bool = True,
                        chunk_size: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`~zkd_jax.integrations.tunix.logit_objective` with ``token_mean="valid"``."""
    return logit_objective(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                           standardize=standardize, token_mean="valid", chunk_size=chunk_size)


def standardized_logit_strategy(student_forward_fn: Callable[..., jax.Array],
                                teacher_forward_fn: Callable[..., jax.Array],
                                labels_fn: Callable[..., Any], *, temperature: float = 2.0,
                                alpha: float = 0.5, standardize: bool = True,
                                chunk_size: int | None = None):
    """``StandardizedLogitStrategy(..., token_mean="valid")`` (needs google-tunix)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    from zkd_jax.integrations import tunix  # noqa: PLC0415

    return tunix.StandardizedLogitStrategy(student_forward_fn, teacher_forward_fn, labels_fn,
                                           temperature=temperature, alpha=alpha, standardize=standardize,
                                           chunk_size=chunk_size, token_mean="valid")

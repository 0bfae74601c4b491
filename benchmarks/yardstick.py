"""The yardstick of ``train_step.py --yardstick``: a minimal KD(+LS) step written plainly in Flax/optax.

It shares only the model definitions with the project (``zkd_jax.models``); the step, the loss and
the optimizer are written here from the paper, with none of the project's step code (no sharding,
no metrics, no finiteness checks, no schedule), so ``ms_per_step / yardstick_ms_per_step`` says
what the project's step costs over a naive step of the same models and math:

* teacher logits ``t = teacher(x)`` (eval mode), student logits ``s = student(x)`` (train mode,
  BatchNorm batch statistics, running averages updated), both float32 ``[B, C]``;
* ``Z(l) = (l - mean_c l) / (std_c l + 1e-7)`` with the unbiased std (``C - 1``), when
  ``standardize`` (KD+LS), else ``Z(l) = l`` (KD);
* ``loss = ce_weight * CE(s, y) + kd_weight * tau^2 * mean_b KL(softmax(Z(t) / tau) ||
  softmax(Z(s) / tau))``;
* PyTorch SGD: ``g <- g + wd * p``, ``v <- momentum * v + g``, ``p <- p - lr * v`` (optax's
  ``add_decayed_weights`` then ``sgd``), a constant rate (the schedule's value at step 0).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


class YardstickState(NamedTuple):
    """The student's ``params`` and ``batch_stats`` and the optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


def standardize(logits: jax.Array) -> jax.Array:
    """``(l - mean(l)) / (std(l) + 1e-7)`` over the last axis (unbiased std); ``[B, C] -> [B, C]``."""
    mean = jnp.mean(logits, axis=-1, keepdims=True)
    std = jnp.std(logits, axis=-1, keepdims=True, ddof=1)
    return (logits - mean) / (std + 1e-7)


def kd_objective(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
                 temperature: float, ce_weight: float, kd_weight: float,
                 standardize_logits: bool) -> jax.Array:
    """``ce_weight * CE + kd_weight * tau^2 * KL`` (module docstring); logits float32 ``[B, C]``,
    labels int ``[B]``; a float32 scalar."""
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
    if standardize_logits:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1).mean()
    return ce_weight * ce + kd_weight * temperature**2 * kl


def make_yardstick(student: nn.Module, teacher: nn.Module, *, temperature: float,
                   ce_weight: float, kd_weight: float, standardize_logits: bool, lr: float,
                   momentum: float, weight_decay: float
                   ) -> tuple[Callable[[Any, Any], YardstickState], Callable]:
    """``(init, step)``: ``init(params, batch_stats) -> YardstickState`` and the jitted
    ``step(state, teacher_variables, images, labels) -> (state, loss)`` (``state`` donated;
    images ``[B, H, W, 3]`` float32, labels int32 ``[B]``)."""
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))

    def init(params, batch_stats) -> YardstickState:
        return YardstickState(params, batch_stats, tx.init(params))

    def step(state: YardstickState, teacher_variables, images, labels):
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_variables, images, train=False).astype(jnp.float32))

        def loss_fn(params):
            logits, updates = student.apply({"params": params, "batch_stats": state.batch_stats},
                                            images, train=True, mutable=["batch_stats"])
            loss = kd_objective(logits.astype(jnp.float32), teacher_logits, labels,
                                temperature=temperature, ce_weight=ce_weight,
                                kd_weight=kd_weight, standardize_logits=standardize_logits)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return YardstickState(optax.apply_updates(state.params, updates), batch_stats,
                              opt_state), loss

    return init, jax.jit(step, donate_argnums=(0,))

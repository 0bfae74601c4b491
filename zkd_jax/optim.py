"""The optimizer of the reference (PyTorch SGD) and its epoch-wise step-decay schedule.

SPEC.md section 3: weight decay is *coupled* (added to the gradient, ``g + wd * p``) on every
trainable parameter, BatchNorm scales and biases and CTKD's temperature included, before momentum:
``v = momentum * v + g; p = p - lr * v`` with ``v`` starting at 0. That is
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(schedule, momentum))``.

The rate for epoch ``e`` (counted from 1) is ``lr * decay_rate ** #{m in milestones : e > m}``; it
changes at epoch boundaries only. In steps: update number ``n`` (counted from 0, optax's count)
belongs to epoch ``n // steps_per_epoch + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax


def lr_for_epoch(
    epoch: int, *, lr: float, milestones: Sequence[int], decay_rate: float = 0.1
) -> float:
    """Host-side rate of epoch ``epoch`` (from 1): ``lr * decay_rate ** #{m : epoch > m}``."""
    return float(lr * decay_rate ** sum(int(epoch > m) for m in milestones))


def step_decay_schedule(
    lr: float, *, steps_per_epoch: int, milestones: Sequence[int], decay_rate: float = 0.1
) -> optax.Schedule:
    """The epoch-wise step decay as an optax schedule of the update count.

    The ``len(milestones) + 1`` rates are computed in float64 on the host and looked up, so the
    float32 rate is the correctly rounded value of ``lr * decay_rate ** k``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1; use a smaller batch.")
    bounds = np.asarray(sorted(int(m) for m in milestones), dtype=np.int32)
    rates = np.asarray([lr * decay_rate**k for k in range(len(bounds) + 1)], dtype=np.float32)

    def schedule(count):
        epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch + 1
        decays = jnp.sum(epoch > jnp.asarray(bounds)).astype(jnp.int32)
        return jnp.asarray(rates)[decays]

    return schedule


def sgd(
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """PyTorch SGD: coupled weight decay on all parameters, then momentum, then ``-lr``."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )

"""The optimizer of the reference (PyTorch SGD) and its epoch-wise step-decay schedule.

As in the reference: weight decay is *coupled* (added to the gradient, ``g + wd * p``) on every
trainable parameter, BatchNorm scales and biases and CTKD's temperature included, before momentum:
``v = momentum * v + g; p = p - lr * v`` with ``v`` starting at 0. That is
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(schedule, momentum))``.

The rate for epoch ``e`` (counted from 1) is ``lr * decay_rate ** #{m in milestones : e > m}``; it
changes at epoch boundaries only. In steps: update number ``n`` (counted from 0, optax's count)
belongs to epoch ``n // steps_per_epoch + 1``. :func:`warmup_cosine_lr` is the alternative
that ``config.optimizer.schedule="cosine"`` picks for SGD (the offline demo's): a linear warm-up
then a cosine decay over the run's updates, changing every update.

The ViT students' recipe is at the end: :func:`adamw` (decoupled decay
masked by :func:`vit_decay_mask`), :func:`cosine_warmup_lr` per epoch and
:func:`per_epoch_schedule`; :func:`sgd_masked` is their ResNet-56 teacher's SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
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


def warmup_cosine_lr(
    step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> float:
    """Host-side rate of update ``step`` (optax's count, from 0) of a linear warm-up then a cosine.

    ``step < W``: ``lr (step + 1) / W``; otherwise, with ``N = total_steps`` and ``W =
    warmup_steps``, ``min_lr + (lr - min_lr) (1 + cos(pi min(step - W, N - W) / (N - W))) / 2``:
    the rate rises to ``lr`` over the first ``W`` updates and falls to ``min_lr`` at update ``N``,
    smoothly, update by update (a schedule that follows the run's length: ``N`` is its updates).

    >>> [round(warmup_cosine_lr(n, lr=0.1, total_steps=6, warmup_steps=2), 4) for n in range(6)]
    [0.05, 0.1, 0.1, 0.0854, 0.05, 0.0146]
    """
    if step < warmup_steps:
        return float(lr * (step + 1) / warmup_steps)
    span = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, span) / span
    return float(min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine_schedule(
    lr: float, *, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> optax.Schedule:
    """:func:`warmup_cosine_lr` as an optax schedule of the update count (float32 on device)."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}] "
                         "and total_steps must be >= 1; use fewer warm-up epochs.")
    span = float(max(total_steps - warmup_steps, 1))

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        warm = lr * (n + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((n - warmup_steps) / span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(n < warmup_steps, warm, cosine).astype(jnp.float32)

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


# --------------------------------------------------------------------------------------------------
# The ViT reference's recipe (pycls)
# --------------------------------------------------------------------------------------------------

#: ``config.optimizer.name`` values (``zkd_jax.trainer.recipe``): :func:`sgd` with the step decay,
#: :func:`adamw` and :func:`sgd_masked` with the per-epoch :func:`cosine_warmup_lr`.
OPTIMIZERS = ("sgd", "adamw", "sgd_masked")

#: ``config.optimizer.schedule`` values of ``"sgd"``: the step decay or :func:`warmup_cosine_lr`.
SGD_SCHEDULES = ("step", "cosine")

#: Parameter names (any path component containing one) never decayed by the ViT recipe.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "distill_token")


def cosine_warmup_lr(
    epoch: int,
    *,
    base_lr: float,
    max_epoch: int,
    min_lr: float = 0.0,
    warmup_epochs: int = 0,
    warmup_factor: float = 0.1,
) -> float:
    """pycls's rate of epoch ``epoch`` (counted from 0), stepped at epoch ends.

    ``e < warmup_epochs``: ``w + e (base_lr - w) / warmup_epochs`` with ``w = base_lr *
    warmup_factor``; otherwise ``min_lr + (base_lr - min_lr) (1 + cos(pi e / max_epoch)) / 2``
    (``e`` not shifted by the warm-up). DeiT & co.: base 5e-4, min 5e-6, 20 epochs from 5e-7;
    ResNet-56 teacher: base 0.1, min 0, no warm-up; 300 epochs both.
    """
    if epoch < warmup_epochs:
        start = base_lr * warmup_factor
        return float(start + epoch * (base_lr - start) / warmup_epochs)
    return float(min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / max_epoch)))


def per_epoch_schedule(rates: Sequence[float], *, steps_per_epoch: int) -> optax.Schedule:
    """Update ``n`` (optax's count, from 0) gets ``rates[min(n // steps_per_epoch, len - 1)]``."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1; use a smaller batch.")
    table = jnp.asarray(np.asarray(rates, dtype=np.float32))

    def schedule(count):
        epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
        return table[jnp.minimum(epoch, len(rates) - 1)]

    return schedule


def vit_decay_mask(params: Any) -> Any:
    """True where the ViT recipe decays a parameter: tensors of rank >= 2 that are neither a
    ``bias`` nor named like ``cls_token``/``pos_embed``/``distill_token`` (pycls's groups: no
    decay on 1-D tensors, biases, tokens and position tables). Also the teacher's rule (its
    1-D BN parameters and biases are not decayed)."""

    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if np.ndim(leaf) < 2 or names[-1] == "bias":
            return False
        return not any(token in name for name in names for token in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    schedule: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mask: Any = vit_decay_mask,
) -> optax.GradientTransformation:
    """torch.optim.AdamW: ``p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)`` (decoupled decay,
    on the parameters ``mask`` selects; ``mask`` is a tree of bools or a function of the params)."""
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def sgd_masked(
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    mask: Any = vit_decay_mask,
) -> optax.GradientTransformation:
    """PyTorch SGD with coupled weight decay only where ``mask`` is True (pycls's ResNet-56 recipe:
    no decay on 1-D tensors and biases; nesterov)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )

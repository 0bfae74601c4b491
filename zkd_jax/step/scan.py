"""Several training steps in one program: ``config.steps_per_call = n`` with the on-device feed.

With ``config.input_pipeline = "device"`` every batch is a pure function of (data key, epoch, step)
(the feed's ``build``: ``zkd_jax.data.device.device_train_batch`` with its static settings bound;
the trainer hands it over), so ``n`` consecutive steps need no host input at all.
:func:`make_scanned_step` builds one jitted program that runs ``jax.lax.scan`` over them: each
iteration builds its global batch on the devices and applies the very step function ``zkd-train``
jits for one step (``step.unjitted``: one student or K). The host then dispatches one call per ``n``
steps instead of two per step (batch, step), which matters when a step is shorter than the host's
dispatch work (small models, TPUs).

Same batches, same updates, same order as ``n = 1``: only XLA's fusion of the scanned program
differs, so results agree to float rounding, not bit for bit. :func:`zkd_jax.data.plan.plan` cuts an epoch into
calls: scans of ``n`` steps aligned to the epoch's start, single steps where a scan would run past
the epoch's end (or ``config.max_steps``) or over a ``config.checkpoint_every_steps`` boundary.
A run resumed at an epoch boundary therefore repeats the uninterrupted run's calls exactly (bit for
bit); one resumed inside an epoch agrees to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from zkd_jax.parallel import batch_sharding, replicated


def default_unroll(mesh: Mesh) -> bool:
    """Unroll the n steps on CPU meshes, keep a loop elsewhere.

    XLA:CPU runs a ``lax.scan`` while-loop body far slower than the same steps unrolled
    (docs/measurements.md has the measurement); on accelerators a loop keeps compilation at one
    step's cost.
    """
    return mesh.devices.flat[0].platform == "cpu"


def make_scanned_step(step_fn: Callable, mesh: Mesh, n: int, build: Callable, *,
                      unroll: bool | None = None) -> Callable:
    """The jitted ``scanned(state, teacher_variables, images, labels, key, epoch, first, order)``.

    Runs ``step_fn(state, teacher_variables, batch, epoch)`` for the global steps ``first, ...,
    first + n - 1`` of ``epoch`` (0-based within the epoch), each ``batch`` built by
    ``build(images, labels, key, epoch, step, order=order)`` (pure and jittable: the on-device
    feed's ``Feed.device.build``, ``zkd_jax.data.device.train_batch_builder``) and sharded over
    the mesh's ``"data"`` axis. Returns the final state and the metrics stacked on a leading
    ``[n]`` axis. ``state`` is donated; everything else is replicated.
    ``unroll``: n copies of the step instead of a loop (default: :func:`default_unroll`).
    """
    sharded = batch_sharding(mesh)
    unroll = default_unroll(mesh) if unroll is None else bool(unroll)

    def scanned(state, teacher_variables, images, labels, key, epoch, first, order):
        def body(carry, i):
            with jax.named_scope("input"):  # images: [N, H*W*C] as the feed holds them, or NHWC
                batch = build(images, labels, key, epoch, first + i, order=order)
            batch = jax.lax.with_sharding_constraint(batch, sharded)
            return step_fn(carry, teacher_variables, batch, epoch)

        return jax.lax.scan(body, state, jnp.arange(n, dtype=jnp.int32), unroll=unroll)

    rep = replicated(mesh)
    return jax.jit(scanned, in_shardings=rep, out_shardings=(rep, rep), donate_argnums=(0,))


__all__ = ["default_unroll", "make_scanned_step"]

"""K students in one program: the teacher runs once per batch, K student updates follow.

The K train states are stacked on a leading axis (every leaf gets shape ``[K, ...]``). One jitted
step (``make_multi_train_step``) runs the teacher forward once and then ``students_update`` over the
stack, in one of two forms (``config.students_form``):

* ``"loop"`` (default): the K single-student updates unrolled in one program. Each student runs
  the single-student computation (equal to a single run up to XLA's fusion rounding, ~1e-11 per
  step here); only the teacher is shared.
* ``"vmap"``: ``jax.vmap`` over the stacked students; XLA turns the batched convolutions into
  grouped ones (``feature_group_count = K``) and their kernel gradients into batch-grouped ones
  (``batch_group_count = K``). Students whose method settings differ select their objective with
  ``jax.lax.switch`` (every branch is evaluated on ``[B, classes]`` logits: negligible).
* ``"vmap_matmul"``: the same ``vmap``, but each student convolution (``groups == 1``) is traced
  as patches (the ``kh kw`` shifted views concatenated on channels) times the reshaped kernel, so
  the K students' convolutions, forward and backward, are batched matrix products (one
  ``dot_general`` with a K batch dimension each) rather than grouped convolutions; the teacher
  keeps XLA's convolution. Same sums, another order of accumulation (float rounding).

The forms' speeds: docs/measurements.md.

THE SEAM: ``students_update`` is the one function that maps the single-student update
(``zkd_jax.step.make_student_update``) over the K students. A faster form (for instance students
fused into grouped convolutions by hand with a layout cuDNN handles well, or a Pallas kernel) goes
there, keeping its signature, without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from zkd_jax.methods import Method, wants_heads
from zkd_jax.models.layers import conv_implementation
from zkd_jax.parallel import replicated
from zkd_jax.step.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    make_initializer,
    replicated_shapes,
)
from zkd_jax.step.train_step import TeacherCall, jit_train_step, make_student_update, teacher_forward
from zkd_jax.views import images_of

StudentsUpdate = Callable[..., tuple[TrainState, dict]]


def _stack(*states):
    return jax.tree.map(lambda *v: jnp.stack(v), *states)


def _take(stacked, k: int):
    return jax.tree.map(lambda v: v[k], stacked)


class StateStack:
    """Stacks K train states on a leading axis and takes student ``k`` back out, each one jitted
    program compiled once per instance (a run holds one: they run at every save and evaluation)."""

    def __init__(self, mesh: Mesh | None = None):
        sharding = None if mesh is None else replicated(mesh)
        self._stack = jax.jit(_stack, out_shardings=sharding)
        self._take = jax.jit(_take, out_shardings=sharding, static_argnums=(1,))

    def stack(self, states: Sequence[TrainState]) -> TrainState:
        """K train states -> one with every leaf stacked on a new leading axis (replicated)."""
        return self._stack(*states)

    def take(self, stacked: TrainState, k: int) -> TrainState:
        """Student ``k`` of a stacked state (a plain single-student ``TrainState``)."""
        return self._take(stacked, k)


def stack_states(states: Sequence[TrainState], mesh: Mesh | None = None) -> TrainState:
    """K train states -> one stacked state (one-off; a run uses a :class:`StateStack`)."""
    return StateStack(mesh).stack(states)


def unstack_state(stacked: TrainState, k: int, mesh: Mesh | None = None) -> TrainState:
    """Student ``k`` of a stacked state (one-off; a run uses a :class:`StateStack`)."""
    return StateStack(mesh).take(stacked, k)


def create_states(
    student: nn.Module, method_list: Sequence[Method], seeds: Sequence[int],
    tx: optax.GradientTransformation, *, input_shape: tuple[int, ...], mesh: Mesh | None = None,
) -> list[TrainState]:
    """One state per student, initialized exactly as a single run of that seed (one compiled
    init shared by the K students)."""
    init = make_initializer(student, input_shape, mesh=mesh)
    states = []
    for method, seed in zip(method_list, seeds, strict=True):
        root = jax.random.PRNGKey(seed)
        states.append(create_train_state(
            student, method, tx, init_rng=jax.random.fold_in(root, 0),
            step_rng=jax.random.fold_in(root, 1), input_shape=input_shape, mesh=mesh, init=init,
        ))
    return states


def abstract_states(
    student: nn.Module, method_list: Sequence[Method], tx: optax.GradientTransformation, *,
    input_shape: tuple[int, ...], mesh: Mesh, stacked: bool,
) -> TrainState:
    """The shapes (``jax.ShapeDtypeStruct``, replicated over ``mesh``) of the state a run's step
    takes: one student's (``stacked=False``) or the K students' stacked on a leading axis, as
    :func:`create_states` then :class:`StateStack` build it. Nothing runs on a device."""
    one = abstract_train_state(student, method_list[0], tx, input_shape=input_shape, mesh=mesh)
    if not stacked:
        return one
    k = len(method_list)
    return replicated_shapes(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), one), mesh)


FORMS = ("loop", "vmap", "vmap_matmul")


def students_update(
    update_one: Callable[..., tuple[TrainState, dict]],
    states: TrainState, branch: np.ndarray, teacher_logits, images, labels, epoch,
    *, form: str = "loop",
) -> tuple[TrainState, dict]:
    """THE SEAM: ``update_one`` over K stacked students; the teacher's outputs are shared.

    Args:
      update_one: ``(state, branch, teacher_logits, images, labels, epoch) -> (state, metrics)``
        for one student (``branch``: which of the distinct method settings; a Python int or a
        traced int32 scalar).
      states: stacked ``TrainState`` (leading axis K).
      branch: int32 ``[K]`` (host array: static).
      teacher_logits, images, labels, epoch: as for one student (not mapped).
      form: ``"loop"``: the K single-student updates unrolled in one program (each the single
        run's computation). ``"vmap"``: ``jax.vmap`` over the stack (grouped convolutions; about
        1.0x one student on an H100, as reported). ``"vmap_matmul"``: the same vmap with the
        students' convolutions traced as patch matrix products
        (``zkd_jax.models.layers.conv_implementation``), so the K students' convolutions become
        batched matrix products. A faster form goes here, same signature.

    Returns:
      The stacked new states and metrics (each ``[K]``).
    """
    if form in ("vmap", "vmap_matmul"):
        impl = "matmul" if form == "vmap_matmul" else "xla"
        with conv_implementation(impl):  # read while vmap traces the students' convolutions
            return jax.vmap(update_one, in_axes=(0, 0, None, None, None, None))(
                states, jnp.asarray(branch), teacher_logits, images, labels, epoch
            )
    if form == "loop":
        outs = [
            update_one(jax.tree.map(lambda x, k=k: x[k], states), int(b), teacher_logits, images,
                       labels, epoch)
            for k, b in enumerate(branch)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    raise ValueError(f"config.students_form={form!r} is not one of {', '.join(FORMS)}; use one.")


def _branches(method_list: Sequence[Method]) -> tuple[list[Method], np.ndarray]:
    distinct: list[Method] = []
    index = []
    for m in method_list:
        if m not in distinct:
            distinct.append(m)
        index.append(distinct.index(m))
    return distinct, np.asarray(index, np.int32)


def make_multi_train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    method_list: Sequence[Method],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    form: str = "loop",
    teacher_call: TeacherCall = TeacherCall(),
) -> Callable[[TrainState, Any, Mapping[str, Any], Any], tuple[TrainState, dict]]:
    """The jitted ``train_step(stacked_state, teacher_variables, batch, epoch)`` of K students.

    Same contract as ``zkd_jax.step.train_step.make_train_step`` (state donated, batch sharded on "data",
    the rest replicated, ``teacher_call`` how the teacher sees the batch) except that the state and
    every metric carry a leading K axis.
    ``form`` picks the ``students_update`` implementation ("vmap" or "loop").
    """
    if form not in FORMS:
        raise ValueError(
            f"config.students_form={form!r} is not one of {', '.join(FORMS)}; use one.")
    method_list = list(method_list)
    first = method_list[0]
    if first.needs_teacher and teacher is None:
        raise ValueError("this method distills from a teacher; pass the teacher module.")
    distinct, branch_index = _branches(method_list)
    objectives = [m.objective for m in distinct]

    def update_one(state, branch, teacher_logits, images, labels, epoch):
        if len(objectives) == 1 or isinstance(branch, int):
            objective = objectives[0 if len(objectives) == 1 else branch]
        else:
            def objective(*args):
                return jax.lax.switch(branch, objectives, *args)
        update = make_student_update(student, objective, tx, learning_rate_fn=learning_rate_fn,
                                     heads=wants_heads(first))
        return update(state, teacher_logits, images, labels, epoch)

    def train_step(states: TrainState, teacher_variables, batch, epoch):
        labels = batch["label"]
        images = images_of(batch, first.views)
        teacher_logits = teacher_forward(teacher, teacher_variables, images, first, teacher_call)
        return students_update(update_one, states, branch_index, teacher_logits, images,
                               labels, epoch, form=form)

    return jit_train_step(train_step, mesh)


__all__ = [
    "FORMS", "StateStack", "abstract_states", "create_states", "make_multi_train_step", "stack_states",
    "students_update", "unstack_state",
]

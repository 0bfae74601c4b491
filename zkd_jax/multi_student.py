"""Several students in one program: the teacher runs once per batch, K students are updated.

``config.students`` lists K students of ``config.student.arch``; each entry is a dict with a
``seed`` (its initialization and in-step randomness: ``PRNGKey(seed)`` folded with 0 and 1, exactly
as a single run of that seed) and optionally any setting of ``config.method`` to override for that
student, typically ``temperature`` (the base temperature) and ``kd_weight`` (for DKD: ``alpha``,
``beta``). All students see the same batches (the data order follows ``config.seed``), so a student
whose seed equals ``config.seed`` and whose settings equal ``config.method`` follows the same
trajectory as the single-student run of that config.

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

Measured on this project's 2-core CPU (resnet8 <- resnet8, batch 32, K = 2): "loop" 1.22x to
1.53x, "vmap" 0.39x to 0.47x, "vmap_matmul" 0.95x the total images/s of one student (grouped
convolutions are slow on CPU). Issue 7 reports that a naive vmap measured about 1.0x on an H100,
i.e. no gain from sharing the program there; the GPU ranking of the three is not measured yet.

THE SEAM: ``students_update`` is the one function that maps the single-student update
(``zkd_jax.step.make_student_update``) over the K students. A faster form (for instance students
fused into grouped convolutions by hand with a layout cuDNN handles well, or a Pallas kernel) goes
there, keeping its signature, without touching the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from zkd_jax import methods as methods_lib
from zkd_jax.methods import Method
from zkd_jax.models.layers import conv_implementation
from zkd_jax.step import VIEW_KEYS, jit_train_step, make_student_update, replicated, teacher_forward
from zkd_jax.train_state import TrainState, create_train_state

STUDENT_DIR = "student_{}"

StudentsUpdate = Callable[..., tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One student of ``config.students``: its seed and its full method settings."""

    seed: int
    method: dict


def student_specs(config) -> list[StudentSpec]:
    """Parses ``config.students`` into K specs (empty list: the usual single student).

    Each entry is a dict ``{"seed": int, **method overrides}`` (a bare int is a seed).

    Raises:
      ValueError: an entry without a seed, an override the method does not have, or ``name``.
    """
    entries = config.get("students") or ()
    if config.get("sweep"):
        from zkd_jax.configs import sweep  # pylint: disable=import-outside-toplevel

        if entries:
            raise ValueError("set config.students or config.sweep, not both.")
        entries = sweep.expand(config.sweep, default_seed=int(config.get("seed", 0)))
    base = dict(config.method.to_dict() if hasattr(config.method, "to_dict") else config.method)
    specs = []
    for k, entry in enumerate(entries):
        entry = {"seed": entry} if isinstance(entry, (int, np.integer)) else dict(entry)
        if "seed" not in entry:
            raise ValueError(f"config.students[{k}] has no 'seed'; give every student a seed, "
                             "e.g. {'seed': 1, 'temperature': 3.0}.")
        seed = int(entry.pop("seed"))
        if "name" in entry:
            raise ValueError(f"config.students[{k}] sets the method name; all students share "
                             "config.method.name, so remove 'name' from the entry.")
        settings = dict(base)
        ctkd = dict(settings.get("ctkd") or {})
        for key, value in entry.items():
            if key in ctkd:
                ctkd[key] = value
            else:
                settings[key] = value
        if ctkd:
            settings["ctkd"] = ctkd
        methods_lib.from_config(settings)  # raises the ValueError of an unknown setting
        specs.append(StudentSpec(seed=seed, method=settings))
    return specs


def build_methods(specs: Sequence[StudentSpec]) -> list[Method]:
    """The K methods; they must share class, views and parameter structure.

    Raises:
      ValueError: two students' methods differ in parameter structure (e.g. CTKD ``learn``).
    """
    built = [methods_lib.from_config(s.method) for s in specs]
    first = jax.tree.structure(built[0].init_params())
    for k, m in enumerate(built[1:], 1):
        if jax.tree.structure(m.init_params()) != first or m.views != built[0].views:
            raise ValueError(f"config.students[{k}] changes the method's parameters or views; "
                             "students may differ only in numeric settings such as temperature.")
    return built


def _stack(*states):
    return jax.tree.map(lambda *v: jnp.stack(v), *states)


def _take(stacked, k: int):
    return jax.tree.map(lambda v: v[k], stacked)


@functools.lru_cache(maxsize=None)
def _jitted(fn, sharding, static: tuple = ()):
    """One compiled stack/take per (function, sharding, static args): they run every save/eval."""
    return jax.jit(fn, out_shardings=sharding, static_argnums=static)


def stack_states(states: Sequence[TrainState], mesh: Mesh | None = None) -> TrainState:
    """K train states -> one with every leaf stacked on a new leading axis (replicated)."""
    return _jitted(_stack, None if mesh is None else replicated(mesh))(*states)


def unstack_state(stacked: TrainState, k: int, mesh: Mesh | None = None) -> TrainState:
    """Student ``k`` of a stacked state (a plain single-student ``TrainState``)."""
    return _jitted(_take, None if mesh is None else replicated(mesh), (1,))(stacked, k)


def create_states(
    student: nn.Module, method_list: Sequence[Method], seeds: Sequence[int],
    tx: optax.GradientTransformation, *, input_shape: tuple[int, ...], mesh: Mesh | None = None,
) -> list[TrainState]:
    """One state per student, initialized exactly as a single run of that seed."""
    states = []
    for method, seed in zip(method_list, seeds, strict=True):
        root = jax.random.PRNGKey(seed)
        states.append(create_train_state(
            student, method, tx, init_rng=jax.random.fold_in(root, 0),
            step_rng=jax.random.fold_in(root, 1), input_shape=input_shape, mesh=mesh,
        ))
    return states


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
        1.0x one student on an H100 per issue 7). ``"vmap_matmul"``: the same vmap with the
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
) -> Callable[[TrainState, Any, Mapping[str, Any], Any], tuple[TrainState, dict]]:
    """The jitted ``train_step(stacked_state, teacher_variables, batch, epoch)`` of K students.

    Same contract as ``zkd_jax.step.make_train_step`` (state donated, batch sharded on "data",
    the rest replicated) except that the state and every metric carry a leading K axis.
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
        update = make_student_update(student, objective, tx, learning_rate_fn=learning_rate_fn)
        return update(state, teacher_logits, images, labels, epoch)

    def train_step(states: TrainState, teacher_variables, batch, epoch):
        labels = batch["label"]
        images = {view: batch[VIEW_KEYS[view]] for view in first.views}
        teacher_logits = teacher_forward(teacher, teacher_variables, images, first)
        return students_update(update_one, states, branch_index, teacher_logits, images,
                               labels, epoch, form=form)

    return jit_train_step(train_step, mesh)


@functools.lru_cache(maxsize=8)
def cached_multi_train_step(student, teacher, method_list: tuple, mesh, solver: tuple,
                            form: str = "loop"):
    """(schedule, tx, step) per (models, methods, mesh, solver, form), like
    ``train._optimizer_and_step``."""
    from zkd_jax.train import make_optimizer

    schedule, tx = make_optimizer(solver)
    step = make_multi_train_step(student, teacher, method_list, tx, mesh,
                                 learning_rate_fn=schedule, form=form)
    return schedule, tx, step


__all__ = [
    "FORMS", "STUDENT_DIR", "StudentSpec", "build_methods", "cached_multi_train_step",
    "create_states",
    "make_multi_train_step", "stack_states", "student_specs", "students_update", "unstack_state",
]

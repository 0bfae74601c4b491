"""The jitted programs ``zkd-train`` runs for a config, with abstract arguments, for compiling only.

:func:`compile_plan` builds, for a mesh of any devices (a TPU topology's on a machine without a
TPU, ``zkd_jax.aot``), the very functions :func:`zkd_jax.trainer.setup.train_students` jits
(its ``build_models``, ``make_step``, ``make_eval_step`` and, with ``config.steps_per_call > 1``,
``zkd_jax.step.scan.make_scanned_step``) and the arguments they would receive as
``jax.ShapeDtypeStruct``s with the run's shardings: the train state and the teacher's variables
from ``jax.eval_shape`` of the code that creates them, the batches from their shapes. Nothing
executes on a device, nothing is read (no teacher checkpoint, no dataset) or written.
:func:`topology_plan` is the same from the config's plain values, as ``zkd_jax.aot``'s compiling
child receives them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

import zkd_jax.data as data
from zkd_jax.data import device as device_data
from zkd_jax.data import plan as plan_lib
from zkd_jax.parallel import abstract_batch, replicated
from zkd_jax.step import abstract_states, make_eval_step, student_variables
from zkd_jax.step.multi import FORMS
from zkd_jax.step.scan import default_unroll, make_scanned_step
from zkd_jax.trainer import recipe, setup, students, validate
from zkd_jax.views import BATCH_KEYS


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program and its abstract arguments.

    Attributes:
      name: ``train_step``, ``train_step[<form>]`` (K students), ``scanned_steps`` or
        ``eval_step``.
      function: the ``jax.jit`` object ``zkd-train`` calls.
      args: its arguments (``ShapeDtypeStruct``s with shardings).
      images: global images one call consumes.
      steps: train steps one call runs (eval: 0).
      unrolled: the call's steps are unrolled copies (else a loop whose body XLA's cost analysis
        counts once).
      runs: ``zkd-train`` runs this program for the config (False: another K-student form).
    """

    name: str
    function: Callable
    args: tuple
    images: int
    steps: int
    unrolled: bool = True
    runs: bool = True


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    """The programs of a run and the counts that turn one call's cost into an epoch's."""

    programs: list[Program]
    steps_per_epoch: int
    global_batch: int
    eval_batch: int
    eval_batches: int
    students: int
    mixed_precision: bool


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _train_batch(views: Sequence[str], batch: int, image_shape, mesh: Mesh) -> dict:
    shapes = {BATCH_KEYS[v]: ((batch, *image_shape), jnp.float32) for v in views}
    shapes["label"] = ((batch,), jnp.int32)
    return abstract_batch(shapes, mesh)


def _scalar(dtype, mesh: Mesh, shape=()) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(mesh))


def _scanned(config, step, state, teacher_variables, mesh: Mesh, epoch) -> Program:
    """``config.steps_per_call`` steps in one program, fed by the on-device split."""
    n = config.steps_per_call
    plan_lib.check_steps_per_call(n, config.get("input_pipeline") or "tfdata")
    info = data.info(config.dataset)
    num_train = data.num_train_examples(config.dataset, config.get("train_examples", -1))
    size = info.image_size
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    order = jax.eval_shape(lambda k: device_data.epoch_permutation(k, 1, num_train), key)
    unroll = default_unroll(mesh)
    build = device_data.train_batch_builder(config.batch_size, tuple(info.mean), tuple(info.std))
    scanned = make_scanned_step(step.unjitted, mesh, n, build, unroll=unroll)
    args = (state, teacher_variables, _scalar(jnp.uint8, mesh, (num_train, size * size * 3)),
            _scalar(jnp.int32, mesh, (num_train,)), _scalar(key.dtype, mesh, key.shape), epoch,
            _scalar(jnp.int32, mesh), _scalar(order.dtype, mesh, order.shape))
    return Program("scanned_steps", scanned, args, images=n * config.batch_size, steps=n,
                   unrolled=unroll)


def compile_plan(config: ml_collections.ConfigDict, mesh: Mesh, *,
                 all_forms: bool = False) -> CompilePlan:
    """The programs ``zkd-train`` runs for ``config`` on ``mesh``, with abstract arguments.

    Programs: the train step (one student, or the K students of ``config.students`` in
    ``config.students_form``; with ``all_forms`` every form of ``zkd_jax.step.multi.FORMS``),
    the scanned steps when ``config.steps_per_call > 1``, and the eval step (one student's
    variables; the global eval batch is ``config.eval_batch_size`` rounded up to the device
    count).

    Raises:
      ValueError: the config is not valid for a mesh of this many devices (one line, as
        ``zkd-train`` says it).
    """
    devices = mesh.devices.size
    validate.check_config(config, devices=devices)
    specs, single = students.run_students(config)
    method_list = students.build_methods(specs)
    method = method_list[0]
    info, image_shape, _, student, teacher, teacher_variables = setup.build_models(
        config, method, mesh, abstract=True)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size,
                                           config.get("train_examples", -1))
    batch = _train_batch(method.views, config.batch_size, image_shape, mesh)
    epoch = _scalar(jnp.int32, mesh)
    configured = config.get("students_form") or "loop"
    forms = [None] if single else ([configured] + [f for f in FORMS if f != configured]
                                   if all_forms else [configured])
    tx = recipe.make_optimizer(config.optimizer, steps_per_epoch, config.epochs)[1]
    state = abstract_states(student, method_list, tx, input_shape=(1, *image_shape), mesh=mesh,
                            stacked=not single)
    programs = []
    for form in forms:
        cfg = config
        if form is not None and form != configured:
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.students_form = form
        _, step = setup.make_step(cfg, student, teacher, method_list, mesh, steps_per_epoch,
                                  single=single)
        name = "train_step" if form is None else f"train_step[{form}]"
        programs.append(Program(name, step, (state, teacher_variables, batch, epoch),
                                images=config.batch_size, steps=1, runs=form == forms[0]))
        if (config.get("steps_per_call") or 1) > 1 and form == forms[0]:
            programs.append(_scanned(config, step, state, teacher_variables, mesh, epoch))
    one = abstract_states(student, method_list[:1], tx, input_shape=(1, *image_shape), mesh=mesh,
                          stacked=False)
    eval_batch = _round_up(config.eval_batch_size, devices)
    eval_args = (student_variables(one), abstract_batch({
        "image": ((eval_batch, *image_shape), jnp.float32), "label": ((eval_batch,), jnp.int32),
        "mask": ((eval_batch,), np.bool_)}, mesh))
    programs.append(Program("eval_step", make_eval_step(student, mesh), eval_args,
                            images=eval_batch, steps=0))
    return CompilePlan(
        programs=programs, steps_per_epoch=steps_per_epoch, global_batch=config.batch_size,
        eval_batch=eval_batch, eval_batches=device_data.num_eval_batches(info.num_test, eval_batch),
        students=len(specs), mixed_precision=bool(config.mixed_precision))


def topology_plan(fields: Mapping[str, Any], mesh: Mesh, *, chips: int,
                  per_chip_batch: int | None = None, all_forms: bool = False) -> CompilePlan:
    """:func:`compile_plan` of the config whose plain values are ``fields`` (``config.to_dict()``),
    on the ``chips`` chips of ``mesh``; ``per_chip_batch``: the global batch is that times
    ``chips`` (None: the config's ``batch_size``)."""
    config = ml_collections.ConfigDict(dict(fields))
    if per_chip_batch:
        config.batch_size = int(per_chip_batch) * chips
    return compile_plan(config, mesh, all_forms=all_forms)


__all__ = ["CompilePlan", "Program", "compile_plan", "topology_plan"]

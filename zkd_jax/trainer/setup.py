"""``train_students(config, workdir)``: one run of K >= 1 students (or a teacher), resumable.

The one place below the command line that reads the whole config: it turns it into the values
each layer takes (feed, models, optimizer, step, checkpointers, :class:`LoopSettings`) and hands
them to ``zkd_jax.trainer.loop.run_epochs``.

Students: without ``config.students``, one student (``config.seed``, ``config.method``) whose
outputs are the workdir itself; with K entries, K students of ``config.student.arch`` trained in one
program (the teacher runs once per batch; ``zkd_jax.step.multi``), each in ``workdir/student_<k>/``
laid out like a single run's workdir, and ``workdir/summary.json`` lists the K summaries.
Checkpoints hold one student's ``TrainState`` each, all written at the same steps.

Resuming: the newest checkpoint step ``s`` (K students: the newest every student has) restarts
training at epoch ``s // steps_per_epoch + 1`` from batch ``s % steps_per_epoch`` of that epoch
(the feeds are deterministic), and in-step randomness is folded with the step, so a stopped and
resumed run ends bit-identical to an uninterrupted one.

The teacher must exist: training a missing one (``config.teacher.train_if_missing``) is done
before, by the door (``zkd_jax.trainer.runs.train_and_evaluate``), which also checks the config,
starts ``jax.distributed`` and locks the workdir before it calls :func:`train_students`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

import zkd_jax.data as data
from zkd_jax import models
from zkd_jax.models import fold
from zkd_jax.trainer import recipe, records
from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import paths
from zkd_jax.parallel import create_mesh, replicate
from zkd_jax.step import (
    StateStack,
    TeacherCall,
    abstract_variables,
    create_states,
    make_eval_step,
    make_multi_train_step,
    make_train_step,
)
from zkd_jax.step.state import replicated_shapes
from zkd_jax.trainer import identity as identity_lib
from zkd_jax.trainer import students as students_lib
from zkd_jax.trainer.cohort import OneStudent, StudentStack
from zkd_jax.trainer.loop import LoopSettings, log_main, run_epochs

def _model_dataset(config) -> str:
    """The model-zoo family of a dataset (``zkd_jax.models.create``'s ``dataset``)."""
    default = "imagenet" if config.dataset.startswith("imagenet") else "cifar100"
    return config.get("model_dataset") or default


def loop_settings(config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> LoopSettings:
    """The values of ``config`` that the epoch loop reads."""
    lr_for_epoch = recipe.lr_for_epoch(config.optimizer, config.epochs, steps_per_epoch)
    return LoopSettings(
        epochs=config.epochs, max_steps=config.max_steps, batch_size=config.batch_size,
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint_every_steps,
        checkpoint_every_epochs=config.checkpoint_every_epochs,
        eval_every_epochs=config.eval_every_epochs,
        progress_bar=config.progress_bar,
        lr_for_epoch=lr_for_epoch, paper_top1=config.paper.get("top1"),
        profile_steps=config.get("profile_steps") or 0,
        profile_start_step=config.get("profile_start_step", 2),
    )


def build_models(config: ml_collections.ConfigDict, method, mesh, *, abstract: bool = False):
    """(info, image_shape, model_dataset, student, teacher, teacher_variables) of a run; the
    teacher is None (variables ``{}``) for a method without teacher. ``image_shape`` is the
    students' (``recipe.images``: the ViT students' size); the teacher is of its own family and
    size where ``config.vit`` says so. ``abstract`` (compiling only, ``zkd_jax.trainer.programs``):
    the teacher's variables are ``ShapeDtypeStruct``s of its architecture, no checkpoint read."""
    info = data.info(config.dataset)
    images = recipe.images(config, info.image_size)
    model_dataset = _model_dataset(config)
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    student = models.create(
        config.student.arch, num_classes=info.num_classes, dataset=model_dataset, dtype=dtype
    )
    fields = recipe.student_fields(config, student, images.image_size)
    if fields:
        student = student.clone(**fields)
    teacher, teacher_variables = None, {}
    if method.needs_teacher:
        teacher = models.create(
            config.teacher.arch, num_classes=info.num_classes, dtype=dtype,
            dataset=recipe.teacher_model_dataset(config, model_dataset),
        )
        if abstract:  # shapes only (zkd-compile): nothing is loaded or run on a device
            teacher_variables = replicated_shapes(jax.eval_shape(
                lambda v: step_teacher_variables(config, teacher, v),
                abstract_variables(teacher, (1, *images.teacher_shape), mesh)), mesh)
        else:
            variables = load_teacher(config, teacher, images.teacher_shape)
            teacher_variables = replicate(step_teacher_variables(config, teacher, variables), mesh)
    return info, images.student_shape, model_dataset, student, teacher, teacher_variables


def teacher_call(config: ml_collections.ConfigDict, teacher) -> TeacherCall:
    """How the run's step calls its teacher (``recipe.images``), with ``folded=True`` when the
    teacher runs in eval mode and its family folds (``zkd_jax.models.fold``)."""
    call = recipe.images(config, data.info(config.dataset).image_size).teacher_call
    if teacher is not None and not call.batch_stats and fold.can_fold(teacher):
        call = dataclasses.replace(call, folded=True)
    return call


def step_teacher_variables(config: ml_collections.ConfigDict, teacher, variables):
    """The teacher variables the step reads: BatchNorm folded into the convolutions and the
    folded kernels in the compute dtype when :func:`teacher_call` says ``folded`` (a pure
    function of the loaded variables, applied once; works under ``jax.eval_shape``); else
    ``variables``. Only the step sees them: checkpoints and exports hold the unfolded teacher."""
    if not teacher_call(config, teacher).folded:
        return variables
    side = recipe.images(config, data.info(config.dataset).image_size).teacher_shape[0]
    return fold.fold_batchnorm(teacher, variables, image_hw=(side, side))


def load_teacher(config, module, input_shape) -> dict:
    """The teacher's variables from ``config.teacher.checkpoint`` (checked against ``module``).

    Raises:
      ValueError: no checkpoint given, a missing one, or one of another arch or shape.
    """
    path = config.teacher.checkpoint
    if not path:
        raise ValueError(
            "config.teacher.checkpoint is not set; convert the published teacher with zkd-convert "
            "and pass --config.teacher.checkpoint=DIR, or set config.teacher.train_if_missing=True."
        )
    return ckpt_lib.load_teacher(
        epath.Path(path), module=module, arch=config.teacher.arch, input_shape=(1, *input_shape),
        allow_unverified=bool(config.teacher.get("allow_unverified", False)),
    )


def make_feed(config: ml_collections.ConfigDict, mesh, views) -> data.Feed:
    """The run's :class:`zkd_jax.data.Feed` (``config.input_pipeline``, ``config.steps_per_call``,
    batch sizes, seed), from the input path's one door, ``zkd_jax.data.make_feed``.

    Raises:
      ValueError: the pipeline cannot serve the run, or ``config.steps_per_call`` asks for scans
        the pipeline cannot feed (see ``zkd_jax.data.plan``).
    """
    images = recipe.images(config, data.info(config.dataset).image_size)
    return data.make_feed(
        config.get("input_pipeline") or "tfdata", dataset=config.dataset, mesh=mesh,
        seed=config.seed, views=views, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, data_dir=config.data_dir,
        augmentation=images.augmentation, image_size=images.image_size,
        train_examples=config.get("train_examples", -1),
        steps_per_call=config.get("steps_per_call") or 1,
    )


def export_function(config, model_dataset: str, num_classes: int):
    """``export(directory, host_variables)`` writing the zkd-convert format; None when
    ``config.export`` is off."""
    if not config.export:
        return None

    def export(directory, variables):
        ckpt_lib.export_variables(directory, variables, arch=config.student.arch,
                                  dataset=model_dataset, num_classes=num_classes, overwrite=True)

    return export


def make_step(config, student, teacher, method_list, mesh, steps_per_epoch: int, *,
              single: bool):
    """``(tx, train_step)`` of a run: the optimizer and the jitted step of one student
    (``single``) or of the K students of ``method_list`` (``config.students_form``). The
    benchmarks time this very step."""
    schedule, tx = recipe.make_optimizer(config.optimizer, steps_per_epoch, config.epochs)
    call = teacher_call(config, teacher)
    if single:
        return tx, make_train_step(student, teacher, method_list[0], tx, mesh,
                                   learning_rate_fn=schedule, teacher_call=call)
    return tx, make_multi_train_step(student, teacher, method_list, tx, mesh,
                                     learning_rate_fn=schedule, teacher_call=call,
                                     form=config.get("students_form") or "loop")


def run_identities(checkpointers, resume: int | None, config, *,
                   allow_config_change: bool) -> list[dict]:
    """What each student's checkpoints store as the run's identity (``zkd_jax.trainer.identity``);
    resuming from step ``resume``, the config is first checked against the checkpoint's, before
    any model is built or array read.

    Raises:
      identity.ConfigChangedError: the config differs in a field that may not change on resume.
    """
    if resume is None:
        return [identity_lib.fresh_identity(config.to_dict()) for _ in checkpointers]
    return [identity_lib.resume_identity(
        identity_lib.stored_meta(c.last.directory, resume), config.to_dict(), step=resume,
        workdir=str(c.workdir), allow_change=allow_config_change) for c in checkpointers]


def restore_states(checkpointers, states, resume: int, *, workdir: epath.Path
                   ) -> tuple[list, list[dict]]:
    """``(states, metas)`` restored from step ``resume``.

    Raises:
      ValueError: the checkpoint does not fit the models of this config (one line, not orbax's
        dump of the two trees).
    """
    metas = []
    for k, checkpointer in enumerate(checkpointers):
        try:
            states[k], meta = checkpointer.restore(states[k], resume)
        except (ValueError, KeyError, TypeError) as err:  # orbax: a tree dump of the mismatch
            raise ValueError(
                f"checkpoint {resume} in {checkpointer.workdir} does not fit the model of this "
                f"config (another student.arch, dataset or method?); choose another --workdir "
                f"for a new run ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:120]}).") from err
        metas.append(meta)
    log_main(f"resuming {workdir}" + ("" if len(checkpointers) == 1 else
                                      f" ({len(checkpointers)} students)") + f" from step {resume}")
    return states, metas


def train_students(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                   allow_config_change: bool = False) -> dict:
    """Trains the run's K >= 1 students in ``workdir``; returns the summary.

    One student: its summary (``summary.json``). K students: ``{"students": [summary, ...]}``.
    The caller (``zkd_jax.trainer.runs``) has checked the config, started ``jax.distributed`` and
    holds the workdir's lock (``zkd_jax.io.lock``). Resumes from the checkpoints in the workdir
    when there are some, if the config is the one they were trained with (but for the fields
    ``zkd_jax.trainer.identity.MAY_CHANGE`` lists; other changes need ``allow_config_change``, and
    are recorded). With ``config.max_steps > 0`` it stops after that many global steps
    (checkpointing there). Outputs: see
    ``zkd_jax.io.metrics`` and ``zkd_jax.io.checkpoint``.

    Raises:
      ValueError: a config a user can fix (batch size vs device count, teacher checkpoint, ...).
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    workdir = paths.absolute(workdir)
    specs, single = students_lib.run_students(config)
    method_list = students_lib.build_methods(specs)
    num = len(specs)
    dirs = [workdir] if single else [workdir / students_lib.STUDENT_DIR.format(k)
                                     for k in range(num)]
    if jax.process_index() == 0:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    checkpointers = [ckpt_lib.Checkpointer(d, keep=config.keep_checkpoints,
                                           keep_damaged=config.get("keep_damaged_checkpoints", 1))
                     for d in dirs]
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size,
                                           config.get("train_examples", -1))
    try:
        resume = students_lib.resume_step(checkpointers)
        resume = records.resume_for_records(  # back to where a lost metrics.jsonl record is computed
            resume, checkpointers, dirs, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
            eval_every_epochs=config.eval_every_epochs)
        identities = run_identities(checkpointers, resume, config,
                                    allow_config_change=allow_config_change)
    except Exception:
        for c in checkpointers:
            c.close()
        raise
    mesh = create_mesh(jax.devices())
    feed = make_feed(config, mesh, method_list[0].views)
    info, image_shape, model_dataset, student, teacher, teacher_variables = build_models(
        config, method_list[0], mesh)
    tx, train_step = make_step(config, student, teacher, method_list, mesh, steps_per_epoch,
                               single=single)
    states = create_states(student, method_list, [s.seed for s in specs], tx,
                           input_shape=(1, *image_shape), mesh=mesh)
    metas: list[dict[str, Any]] = [{} for _ in range(num)]
    if resume is not None:
        states, metas = restore_states(checkpointers, states, resume, workdir=workdir)
    if single:
        cohort = OneStudent(
            dirs=dirs, state=states[0], train_step=train_step, checkpointers=checkpointers,
            metas=metas, summary_fields=[{"config": config.to_dict()}], identity=identities,
        )
    else:
        stack = StateStack(mesh)
        cohort = StudentStack(
            dirs=dirs, state=stack.stack(states), train_step=train_step,
            checkpointers=checkpointers, metas=metas,
            summary_fields=[{"student": k, "student_seed": spec.seed, "data_seed": config.seed,
                             "config": students_lib.student_config(config, spec).to_dict()}
                            for k, spec in enumerate(specs)],
            identity=identities, stack=stack, workdir=workdir,
            config=config.to_dict(),
        )
    del states
    results = run_epochs(
        cohort, loop_settings(config, steps_per_epoch), workdir=workdir, feed=feed,
        teacher_variables=teacher_variables, eval_step=make_eval_step(student, mesh), mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        export=export_function(config, model_dataset, info.num_classes),
    )
    return results[0] if single else {"students": results}

"""``train_and_evaluate(config, workdir)``: one distillation (or teacher) run, resumable.

The path of one batch: ``zkd_jax.feed`` yields it as a global array sharded over the mesh's
``"data"`` axis (from tf.data on the host, or built on the devices: ``config.input_pipeline``) ->
the jitted ``train_step`` (teacher forward, student forward/backward, optax update) -> metrics are
fetched every ``config.log_every_steps`` (progress bar, NaN/inf check) -> at epoch ends: evaluation
on the test split, ``metrics.jsonl`` / TensorBoard / ``summary.json``, orbax checkpoints. This
module sets a run up (models, teacher, optimizer, state, resume); ``zkd_jax.epoch_loop`` runs it.

Resuming: the latest checkpoint of ``workdir/checkpoints`` gives the global step ``s``; training goes
on at epoch ``s // steps_per_epoch + 1`` from batch ``s % steps_per_epoch`` of that epoch
(``train_batches(..., epoch=e, start_step=k)`` is deterministic), and in-step randomness is folded
with the step, so a stopped-and-resumed run ends bit-identical to an uninterrupted one.

``zkd_jax.suite.train_suite(config, workdir)`` runs a teacher and several students, the demo.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from zkd_jax import checkpoint as ckpt_lib
from zkd_jax import feed as feed_lib
from zkd_jax import methods, optim, paths, scan_steps, workdir_lock
from zkd_jax.configs import validate
from zkd_jax.epoch_loop import (
    Cohort,
    NonFiniteLossError,
    evaluate,
    log_main,
    replicate,
    run_epochs,
    to_host,
)
from zkd_jax.step import create_mesh, host_to_global, make_eval_step, make_train_step
from zkd_jax.train_state import TrainState, create_train_state

__all__ = [
    "NonFiniteLossError", "TrainState", "create_mesh", "evaluate", "host_to_global",
    "make_eval_step", "make_train_step", "replicate", "to_host", "train_and_evaluate",
]

TEACHER_SUBDIR = "teacher"


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed when ``config.distributed`` or the environment asks for it."""
    from zkd_jax import distributed  # lazy: single-process runs never need it

    d = config.get("distributed") or {}
    distributed.initialize(
        enabled=d.get("enabled", "auto"), coordinator_address=d.get("coordinator_address"),
        num_processes=d.get("num_processes"), process_id=d.get("process_id"),
    )


def prepare_run(config: ml_collections.ConfigDict) -> None:
    """Before a run takes its workdir: the config checked (``zkd_jax.configs.validate``), then
    ``jax.distributed`` started where asked."""
    validate.check_config(config, devices=0)  # device counts: checked after the backend starts
    initialize_distributed(config)
    validate.check_config(config)


def _image_shape(info) -> tuple[int, int, int]:
    size = info.image_size
    if isinstance(size, int):
        return (size, size, 3)
    size = tuple(int(s) for s in size)
    return size if len(size) == 3 else (*size, 3)


def _model_dataset(config) -> str:
    """The model-zoo family of a dataset (``zkd_jax.models.create``'s ``dataset``)."""
    default = "imagenet" if config.dataset.startswith("imagenet") else "cifar100"
    return config.get("model_dataset") or default


def solver_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple:
    """The hashable solver tuple ``make_optimizer`` takes (lr, momentum, wd, nesterov, milestones,
    decay_rate, steps_per_epoch)."""
    opt = config.optimizer
    return (float(opt.lr), float(opt.momentum), float(opt.weight_decay), bool(opt.nesterov),
            tuple(int(m) for m in opt.milestones), float(opt.decay_rate), steps_per_epoch)


def make_optimizer(solver: tuple):
    """(schedule, tx) of a ``solver_of`` tuple: the step-decay schedule and PyTorch SGD."""
    lr, momentum, weight_decay, nesterov, milestones, decay_rate, steps_per_epoch = solver
    schedule = optim.step_decay_schedule(
        lr, steps_per_epoch=steps_per_epoch, milestones=milestones, decay_rate=decay_rate
    )
    tx = optim.sgd(schedule, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return schedule, tx


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(student, teacher, method, mesh, solver: tuple):
    """(schedule, tx, jitted train step); cached so that runs of one process with the same models,
    method and solver (a resumed run, tests) share one compiled step."""
    schedule, tx = make_optimizer(solver)
    return schedule, tx, make_train_step(student, teacher, method, tx, mesh,
                                         learning_rate_fn=schedule)


def build_models(config: ml_collections.ConfigDict, workdir: epath.Path, method, mesh):
    """(info, image_shape, model_dataset, student, teacher, teacher_variables) of a run; the
    teacher is None (variables ``{}``) for a method without teacher."""
    from zkd_jax import data, models

    info = data.info(config.dataset)
    image_shape = _image_shape(info)
    model_dataset = _model_dataset(config)
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    student = models.create(
        config.student.arch, num_classes=info.num_classes, dataset=model_dataset, dtype=dtype
    )
    teacher, teacher_variables = None, {}
    if method.needs_teacher:
        teacher = models.create(
            config.teacher.arch, num_classes=info.num_classes, dataset=model_dataset, dtype=dtype
        )
        teacher_variables = replicate(
            resolve_teacher(config, workdir, teacher, image_shape), mesh
        )
    return info, image_shape, model_dataset, student, teacher, teacher_variables


def teacher_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config that trains ``config``'s teacher; data and runtime fields follow the student's."""
    if config.teacher.get("recipe") is None:
        raise ValueError("config.teacher.recipe is missing; cannot train the teacher.")
    recipe = copy.deepcopy(config.teacher.recipe)
    for key in ("data_dir", "distributed", "progress_bar", "input_pipeline"):
        recipe[key] = copy.deepcopy(config[key])
    return recipe


def resolve_teacher(config, workdir: epath.Path, module, input_shape) -> dict:
    """The teacher's variables: ``config.teacher.checkpoint``, or trained in ``workdir/teacher``.

    Raises:
      ValueError: no checkpoint and ``train_if_missing`` off, or a checkpoint of another arch.
    """
    path = config.teacher.checkpoint
    if path and ckpt_lib.teacher_directory(path).exists():
        source = epath.Path(path)
    elif config.teacher.train_if_missing:
        source = workdir / TEACHER_SUBDIR
        if not (source / ckpt_lib.EXPORT).exists():
            log_main(f"training the teacher ({config.teacher.arch}) in {source}")
            train_and_evaluate(teacher_recipe(config), source)
    elif path:
        source = epath.Path(path)  # load_teacher raises the "does not exist" error
    else:
        raise ValueError(
            "config.teacher.checkpoint is not set; convert the published teacher with zkd-convert "
            "and pass --config.teacher.checkpoint=DIR, or set config.teacher.train_if_missing=True."
        )
    return ckpt_lib.load_teacher(
        source, module=module, arch=config.teacher.arch, input_shape=(1, *input_shape)
    )


def make_feed(config: ml_collections.ConfigDict, mesh, views) -> feed_lib.Feed:
    """The run's :class:`zkd_jax.feed.Feed` (``config.input_pipeline``, batch sizes, seed).

    Raises:
      ValueError: the pipeline cannot serve the run, or ``config.steps_per_call`` asks for scans
        the pipeline cannot feed (see ``zkd_jax.scan_steps``).
    """
    pipeline = config.get("input_pipeline") or "tfdata"
    scan_steps.check_steps_per_call(config.get("steps_per_call") or 1, pipeline)
    return feed_lib.make_feed(
        pipeline, dataset=config.dataset, mesh=mesh,
        seed=config.seed, views=views, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, data_dir=config.data_dir,
    )


@workdir_lock.holds_workdir(before=prepare_run)
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Trains ``config.student`` with ``config.method`` in ``workdir``; returns the summary.

    With a non-empty ``config.students`` it trains K students at once instead
    (``zkd_jax.train_multi.train_students``; outputs in ``workdir/student_<k>/``).

    Resumes from ``workdir/checkpoints`` when there is one. With ``config.max_steps > 0`` it stops
    after that many global steps (checkpointing there). Outputs: see ``zkd_jax.metrics_io`` and
    ``zkd_jax.checkpoint``.

    Raises:
      ValueError: a config a user can fix (batch size vs device count, teacher checkpoint, ...).
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    if config.get("students"):  # several students in one program: zkd_jax.train_multi
        from zkd_jax import train_multi

        return train_multi.train_students(config, workdir)
    initialize_distributed(config)
    from zkd_jax import data  # data may pull TensorFlow lazily inside its functions

    workdir = paths.absolute(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    method = methods.from_config(config.method)
    mesh = create_mesh()
    feed = make_feed(config, mesh, method.views)
    info, image_shape, model_dataset, student, teacher, teacher_variables = build_models(
        config, workdir, method, mesh)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
    _, tx, train_step = _optimizer_and_step(student, teacher, method, mesh,
                                            solver_of(config, steps_per_epoch))
    root = jax.random.PRNGKey(config.seed)  # purposes: 0 init, 1 in-step, 2 device data (feed)
    state = create_train_state(
        student, method, tx, init_rng=jax.random.fold_in(root, 0),
        step_rng=jax.random.fold_in(root, 1), input_shape=(1, *image_shape), mesh=mesh,
    )
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    meta: dict[str, Any] = {}
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        log_main(f"resuming {workdir} from step {meta.get('step')}")
    cohort = Cohort(
        dirs=[workdir], state=state, train_step=train_step,
        student_state=lambda s, k: s, split_metrics=lambda m: [m],
        checkpointers=[checkpointer], metas=[meta],
        summary_fields=[{"config": config.to_dict()}],
    )
    (result,) = run_epochs(
        cohort, config=config, workdir=workdir, feed=feed, teacher_variables=teacher_variables,
        eval_step=make_eval_step(student, mesh), mesh=mesh, steps_per_epoch=steps_per_epoch,
        export=export_function(config, model_dataset, info.num_classes),
    )
    return result


def export_function(config, model_dataset: str, num_classes: int):
    """``export(directory, host_variables)`` writing the zkd-convert format; None when
    ``config.export`` is off."""
    if not config.export:
        return None
    return functools.partial(ckpt_lib.export_variables, arch=config.student.arch,
                             dataset=model_dataset, num_classes=num_classes)

"""``train_and_evaluate(config, workdir)``: one distillation (or teacher) run, resumable.

The path of one batch: ``zkd_jax.feed`` yields it as a global array sharded over the mesh's
``"data"`` axis (from tf.data on the host, or built on the devices: ``config.input_pipeline``) ->
the jitted
``train_step`` (teacher forward, student forward/backward, optax update) -> metrics are fetched every
``config.log_every_steps`` (progress bar, NaN/inf check) -> at epoch ends: evaluation on the test
split, ``metrics.jsonl`` / TensorBoard / ``summary.json``, orbax checkpoints.

Resuming: the latest checkpoint of ``workdir/checkpoints`` gives the global step ``s``; training goes
on at epoch ``s // steps_per_epoch + 1`` from batch ``s % steps_per_epoch`` of that epoch
(``train_batches(..., epoch=e, start_step=k)`` is deterministic), and in-step randomness is folded
with the step, so a stopped-and-resumed run ends bit-identical to an uninterrupted one.

``zkd_jax.suite.train_suite(config, workdir)`` runs a teacher and several students, the demo.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from zkd_jax import checkpoint as ckpt_lib
from zkd_jax import feed as feed_lib
from zkd_jax import metrics_io, methods, optim, paths
from zkd_jax.step import (
    create_mesh,
    host_to_global,
    make_eval_step,
    make_train_step,
    replicated,
)
from zkd_jax.train_state import TrainState, create_train_state, student_variables

__all__ = [
    "NonFiniteLossError", "TrainState", "create_mesh", "host_to_global", "make_eval_step",
    "make_train_step", "train_and_evaluate",
]

TEACHER_SUBDIR = "teacher"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the run stopped keeping its last good checkpoint."""


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed when ``config.distributed`` or the environment asks for it."""
    from zkd_jax import distributed  # lazy: single-process runs never need it

    d = config.get("distributed") or {}
    distributed.initialize(
        enabled=d.get("enabled", "auto"), coordinator_address=d.get("coordinator_address"),
        num_processes=d.get("num_processes"), process_id=d.get("process_id"),
    )


def to_host(tree: Any) -> Any:
    """NumPy copy of a (replicated) pytree; works when arrays span other processes' devices."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree.map(get, tree)


def replicate(tree: Any, mesh) -> Any:
    """Host values (identical on every process) -> arrays replicated over ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


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


def log_main(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


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


class _EpochMetrics:
    """Fetches step metrics in groups (one host sync per group) and averages them per epoch."""

    def __init__(self):
        self.pending: list[dict] = []
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def flush(self, *, step: int, epoch: int, workdir, checkpointer) -> dict[str, float]:
        if not self.pending:
            return self.last
        fetched = to_host(self.pending)
        first = step - len(fetched) + 1
        for i, m in enumerate(fetched):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                kept = checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"training loss is {loss} at step {first + i} (epoch {epoch}); stopped. The "
                    f"last good checkpoint (step {kept}) is kept in {workdir}/checkpoints: lower "
                    "config.optimizer.lr or check the data, then rerun to resume from it."
                )
            for k, v in m.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.count += 1
        self.last = {k: float(v) for k, v in fetched[-1].items()}
        self.pending = []
        return self.last

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def make_feed(config: ml_collections.ConfigDict, mesh, views) -> feed_lib.Feed:
    """The run's :class:`zkd_jax.feed.Feed` (``config.input_pipeline``, batch sizes, seed)."""
    return feed_lib.make_feed(
        config.get("input_pipeline") or "tfdata", dataset=config.dataset, mesh=mesh,
        seed=config.seed, views=views, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, data_dir=config.data_dir,
    )


def evaluate(eval_step, variables, feed: feed_lib.Feed) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy on the test split (padded rows masked)."""
    totals = {"correct1": 0, "correct5": 0, "count": 0, "ce_sum": 0.0}
    for batch in feed.eval():
        out = to_host(eval_step(variables, batch))
        for k in totals:
            totals[k] += out[k].item()
    n = max(totals["count"], 1)
    return {
        "top1": 100.0 * totals["correct1"] / n,
        "top5": 100.0 * totals["correct5"] / n,
        "test_loss": totals["ce_sum"] / n,
        "test_examples": totals["count"],
    }


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
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    method = methods.from_config(config.method)
    mesh = create_mesh()
    feed = make_feed(config, mesh, method.views)
    info, image_shape, model_dataset, student, teacher, teacher_variables = build_models(
        config, workdir, method, mesh)

    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
    opt = config.optimizer
    solver = solver_of(config, steps_per_epoch)
    schedule, tx, train_step = _optimizer_and_step(student, teacher, method, mesh, solver)
    root = jax.random.PRNGKey(config.seed)  # purposes: 0 init, 1 in-step; data uses config.seed
    state = create_train_state(
        student, method, tx, init_rng=jax.random.fold_in(root, 0),
        step_rng=jax.random.fold_in(root, 1), input_shape=(1, *image_shape), mesh=mesh,
    )
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    meta: dict[str, Any] = {}
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        log_main(f"resuming {workdir} from step {meta.get('step')}")
    step = int(to_host(state.step))
    total_steps = config.epochs * steps_per_epoch
    stop_at = min(total_steps, config.max_steps) if config.max_steps > 0 else total_steps
    best = {"top1": meta.get("best_top1", -1.0), "epoch": meta.get("best_epoch", 0)}
    last = {"top1": meta.get("last_top1"), "epoch": meta.get("last_epoch", 0)}
    writer = metrics_io.MetricsWriter(workdir, enabled=is_main, resume_step=step)
    eval_step = make_eval_step(student, mesh)

    def summary(finished: bool) -> dict:
        return {
            "best_top1": best["top1"] if best["epoch"] else None, "best_epoch": best["epoch"],
            "last_top1": last["top1"], "last_epoch": last["epoch"], "step": step,
            "finished": finished, "paper_top1": config.paper.get("top1"),
            "config": config.to_dict(),
        }

    def save(epoch: int, *, is_best: bool = False) -> None:
        checkpointer.save(state, {
            "epoch": epoch, "best_top1": best["top1"], "best_epoch": best["epoch"],
            "last_top1": last["top1"], "last_epoch": last["epoch"],
        }, best=is_best)

    try:
        while step < stop_at:
            epoch, offset = step // steps_per_epoch + 1, step % steps_per_epoch
            epoch_end = min(epoch * steps_per_epoch, stop_at)
            epoch_arr = replicate(np.int32(epoch), mesh)
            batches = feed.train(epoch, offset)
            tracker = _EpochMetrics()
            progress = metrics_io.Progress(
                epoch=epoch, epochs=config.epochs, total=steps_per_epoch, initial=offset,
                enabled=is_main and config.progress_bar,
            )
            start_time, start_step = time.perf_counter(), step
            for batch in itertools.islice(batches, epoch_end - step):
                state, metrics = train_step(state, teacher_variables, batch, epoch_arr)
                step += 1
                tracker.add(metrics)
                log_now = step % config.log_every_steps == 0 or step == epoch_end
                ckpt_now = config.checkpoint_every_steps > 0 and (
                    step % config.checkpoint_every_steps == 0
                )
                if log_now or ckpt_now:
                    n_new = len(tracker.pending)
                    last_metrics = tracker.flush(step=step, epoch=epoch, workdir=workdir,
                                                 checkpointer=checkpointer)
                    rate = (step - start_step) * config.batch_size / (
                        time.perf_counter() - start_time)
                    progress.update(n_new, loss=last_metrics["loss"], lr=last_metrics["lr"],
                                    img_s=rate)
                if ckpt_now and step < epoch_end:
                    save(epoch)
            tracker.flush(step=step, epoch=epoch, workdir=workdir, checkpointer=checkpointer)
            progress.close()
            seconds = time.perf_counter() - start_time
            if step < epoch_end:
                raise RuntimeError(
                    f"the input pipeline ended after step {step} of epoch {epoch}, before the "
                    f"{steps_per_epoch} steps per epoch that data.steps_per_epoch promised."
                )
            if step < epoch * steps_per_epoch:  # stopped inside the epoch (max_steps)
                save(epoch)
                break
            images_per_sec = (step - start_step) * config.batch_size / max(seconds, 1e-9)
            is_best = False
            if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
                result = evaluate(eval_step, student_variables(state), feed)
                last.update(top1=result["top1"], epoch=epoch)
                is_best = result["top1"] > best["top1"]
                if is_best:
                    best.update(top1=result["top1"], epoch=epoch)
                record = {"epoch": epoch, "step": step,
                          "lr": optim.lr_for_epoch(epoch, lr=opt.lr, milestones=opt.milestones,
                                                   decay_rate=opt.decay_rate),
                          **{f"train_{k}": v for k, v in tracker.means().items() if k != "lr"},
                          **result, "images_per_sec": images_per_sec, "epoch_seconds": seconds}
                writer.write(record)
                log_main(f"{workdir.name} epoch {epoch}/{config.epochs}: loss "
                     f"{record['train_loss']:.4f} top1 {result['top1']:.2f} top5 "
                     f"{result['top5']:.2f} (best {best['top1']:.2f} @ {best['epoch']}), "
                     f"{images_per_sec:.0f} img/s")
                if is_main:
                    metrics_io.write_summary(workdir, summary(finished=False))
            step_due = config.checkpoint_every_steps > 0 and (
                step % config.checkpoint_every_steps == 0)
            if (epoch % config.checkpoint_every_epochs == 0 or epoch == config.epochs or is_best
                    or step_due or step >= stop_at):
                save(epoch, is_best=is_best)
        finished = step >= total_steps
        result = summary(finished)
        if is_main:
            metrics_io.write_summary(workdir, result)
        if finished and config.export and not (workdir / ckpt_lib.EXPORT).exists():
            ckpt_lib.export_variables(
                workdir, to_host(student_variables(state)), arch=config.student.arch,
                dataset=model_dataset, num_classes=info.num_classes,
            )
        return result
    finally:
        writer.close()
        checkpointer.close()

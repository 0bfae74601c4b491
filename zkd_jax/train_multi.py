"""``train_students(config, workdir)``: K students of one architecture trained in one program.

``train_and_evaluate`` delegates here when ``config.students`` is non-empty (see
``zkd_jax.multi_student`` for the entries and the step). Every student gets its own directory
``workdir/student_<k>/`` laid out exactly like a single run's workdir: ``metrics.jsonl``,
``tensorboard/``, ``summary.json`` (plus ``student``, ``student_seed``, ``data_seed``, and
``config`` with that student's seed and method settings), ``checkpoints/``, ``checkpoints_best/``
(its own best epoch) and ``export/``. ``workdir/summary.json`` lists the K summaries.

Checkpoints hold one student's ``TrainState`` each (the single-run format), all written at the same
steps. A restarted run resumes every student from the newest step that all of them have.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections
from etils import epath

from zkd_jax import checkpoint as ckpt_lib
from zkd_jax import metrics_io, multi_student, paths
from zkd_jax.epoch_loop import Cohort, log_main, run_epochs
from zkd_jax.step import create_mesh, make_eval_step
from zkd_jax.train import (
    build_models,
    export_function,
    initialize_distributed,
    make_feed,
    solver_of,
)


def student_config(config: ml_collections.ConfigDict, spec) -> ml_collections.ConfigDict:
    """The single-run config of one student: its seed and method settings, no ``students``."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = spec.seed
        c.method = ml_collections.ConfigDict(spec.method)
        c.students = ()
        if "sweep" in c:
            c.sweep = ""
    return c


def _resume_step(checkpointers) -> int | None:
    """The newest step every student has a checkpoint of (None: a fresh start)."""
    latest = [c.latest_step() for c in checkpointers]
    if all(s is None for s in latest):
        return None
    common = set.intersection(*(set(c.last.all_steps()) for c in checkpointers))
    if not common:
        raise ValueError(
            "the students' checkpoints share no step (a run stopped while saving); delete the "
            "newest checkpoints/<step> folders until every student_<k> has the same newest step."
        )
    return max(common)


def train_students(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Trains the K students of ``config.students``; returns ``{"students": [summary, ...]}``.

    Raises:
      ValueError: a config a user can fix (see ``multi_student.student_specs``, ``train``).
      NonFiniteLossError: a student's loss became NaN/inf (the last good checkpoints are kept).
    """
    initialize_distributed(config)
    from zkd_jax import data

    workdir = paths.absolute(workdir)
    is_main = jax.process_index() == 0
    specs = multi_student.student_specs(config)
    method_list = multi_student.build_methods(specs)
    num = len(specs)
    dirs = [workdir / multi_student.STUDENT_DIR.format(k) for k in range(num)]
    if is_main:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    mesh = create_mesh()
    feed = make_feed(config, mesh, method_list[0].views)
    info, image_shape, model_dataset, student, teacher, teacher_variables = build_models(
        config, workdir, method_list[0], mesh)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
    _, tx, train_step = multi_student.cached_multi_train_step(
        student, teacher, tuple(method_list), mesh, solver_of(config, steps_per_epoch),
        config.get("students_form") or "loop")
    states = multi_student.create_states(
        student, method_list, [s.seed for s in specs], tx, input_shape=(1, *image_shape),
        mesh=mesh)
    checkpointers = [ckpt_lib.Checkpointer(d, keep=config.keep_checkpoints) for d in dirs]
    metas: list[dict[str, Any]] = [{} for _ in range(num)]
    resume = _resume_step(checkpointers)
    if resume is not None:
        for k in range(num):
            states[k], metas[k] = checkpointers[k].restore(states[k], resume)
        log_main(f"resuming {workdir} ({num} students) from step {resume}")
    stacked = multi_student.stack_states(states, mesh)
    del states

    def write_top_summary(summaries: list[dict], finished: bool, step: int) -> None:
        metrics_io.write_summary(workdir, {
            "students": [{k: v for k, v in s.items() if k != "config"} for s in summaries],
            "finished": finished, "step": step, "config": config.to_dict()})

    cohort = Cohort(
        dirs=dirs, state=stacked, train_step=train_step,
        student_state=lambda s, k: multi_student.unstack_state(s, k, mesh),
        split_metrics=lambda m: [{key: v[k] for key, v in m.items()} for k in range(num)],
        checkpointers=checkpointers, metas=metas,
        summary_fields=[{"student": k, "student_seed": spec.seed, "data_seed": config.seed,
                         "config": student_config(config, spec).to_dict()}
                        for k, spec in enumerate(specs)],
        write_top_summary=write_top_summary,
    )
    results = run_epochs(
        cohort, config=config, workdir=workdir, feed=feed, teacher_variables=teacher_variables,
        eval_step=make_eval_step(student, mesh), mesh=mesh, steps_per_epoch=steps_per_epoch,
        export=export_function(config, model_dataset, info.num_classes),
    )
    return {"students": results}

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
import itertools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from zkd_jax import checkpoint as ckpt_lib
from zkd_jax import metrics_io, multi_student, optim, paths
from zkd_jax.step import create_mesh, make_eval_step
from zkd_jax.train import (
    _EpochMetrics,
    build_models,
    evaluate,
    initialize_distributed,
    log_main,
    make_feed,
    replicate,
    solver_of,
    to_host,
)
from zkd_jax.train_state import student_variables


def student_config(config: ml_collections.ConfigDict, spec) -> ml_collections.ConfigDict:
    """The single-run config of one student: its seed and method settings, no ``students``."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = spec.seed
        c.method = ml_collections.ConfigDict(spec.method)
        c.students = ()
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
    opt = config.optimizer
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
    step = int(to_host(stacked.step)[0])
    total_steps = config.epochs * steps_per_epoch
    stop_at = min(total_steps, config.max_steps) if config.max_steps > 0 else total_steps
    best = [{"top1": m.get("best_top1", -1.0), "epoch": m.get("best_epoch", 0)} for m in metas]
    last = [{"top1": m.get("last_top1"), "epoch": m.get("last_epoch", 0)} for m in metas]
    writers = [metrics_io.MetricsWriter(d, enabled=is_main, resume_step=step) for d in dirs]
    configs = [student_config(config, s) for s in specs]
    eval_step = make_eval_step(student, mesh)

    def summary(k: int, finished: bool) -> dict:
        return {
            "best_top1": best[k]["top1"] if best[k]["epoch"] else None,
            "best_epoch": best[k]["epoch"], "last_top1": last[k]["top1"],
            "last_epoch": last[k]["epoch"], "step": step, "finished": finished,
            "paper_top1": config.paper.get("top1"), "student": k,
            "student_seed": specs[k].seed, "data_seed": config.seed,
            "config": configs[k].to_dict(),
        }

    def write_summaries(finished: bool) -> list[dict]:
        out = [summary(k, finished) for k in range(num)]
        if is_main:
            for d, s in zip(dirs, out):
                metrics_io.write_summary(d, s)
            metrics_io.write_summary(workdir, {
                "students": [{k: v for k, v in s.items() if k != "config"} for s in out],
                "finished": finished, "step": step, "config": config.to_dict()})
        return out

    def save(epoch: int, is_best: list[bool]) -> None:
        for k in range(num):
            checkpointers[k].save(multi_student.unstack_state(stacked, k, mesh), {
                "epoch": epoch, "best_top1": best[k]["top1"], "best_epoch": best[k]["epoch"],
                "last_top1": last[k]["top1"], "last_epoch": last[k]["epoch"],
            }, best=is_best[k])

    try:
        while step < stop_at:
            epoch, offset = step // steps_per_epoch + 1, step % steps_per_epoch
            epoch_end = min(epoch * steps_per_epoch, stop_at)
            epoch_arr = replicate(np.int32(epoch), mesh)
            batches = feed.train(epoch, offset)
            trackers = [_EpochMetrics() for _ in range(num)]
            pending: list[dict] = []
            progress = metrics_io.Progress(
                epoch=epoch, epochs=config.epochs, total=steps_per_epoch, initial=offset,
                enabled=is_main and config.progress_bar,
            )
            start_time, start_step = time.perf_counter(), step

            def flush() -> float:
                """Fetches pending [K] metrics, splits them per student; returns the mean loss."""
                nonlocal pending
                if pending:
                    fetched = to_host(pending)
                    for m in fetched:
                        for k in range(num):
                            trackers[k].add({key: v[k] for key, v in m.items()})
                    pending = []
                losses = [t.flush(step=step, epoch=epoch, workdir=d, checkpointer=c)
                          for t, d, c in zip(trackers, dirs, checkpointers)]
                return float(np.mean([l_.get("loss", np.nan) for l_ in losses]))

            for batch in itertools.islice(batches, epoch_end - step):
                stacked, metrics = train_step(stacked, teacher_variables, batch, epoch_arr)
                step += 1
                pending.append(metrics)
                log_now = step % config.log_every_steps == 0 or step == epoch_end
                ckpt_now = config.checkpoint_every_steps > 0 and (
                    step % config.checkpoint_every_steps == 0)
                if log_now or ckpt_now:
                    n_new = len(pending)
                    loss = flush()
                    rate = (step - start_step) * config.batch_size / (
                        time.perf_counter() - start_time)
                    progress.update(n_new, loss=loss, img_s=rate)
                if ckpt_now and step < epoch_end:
                    save(epoch, [False] * num)
            flush()
            progress.close()
            seconds = time.perf_counter() - start_time
            if step < epoch_end:
                raise RuntimeError(
                    f"the input pipeline ended after step {step} of epoch {epoch}, before the "
                    f"{steps_per_epoch} steps per epoch that data.steps_per_epoch promised.")
            if step < epoch * steps_per_epoch:  # stopped inside the epoch (max_steps)
                save(epoch, [False] * num)
                break
            images_per_sec = (step - start_step) * config.batch_size / max(seconds, 1e-9)
            is_best = [False] * num
            if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
                lr = optim.lr_for_epoch(epoch, lr=opt.lr, milestones=opt.milestones,
                                        decay_rate=opt.decay_rate)
                for k in range(num):
                    variables = student_variables(multi_student.unstack_state(stacked, k, mesh))
                    result = evaluate(eval_step, variables, feed)
                    last[k].update(top1=result["top1"], epoch=epoch)
                    is_best[k] = result["top1"] > best[k]["top1"]
                    if is_best[k]:
                        best[k].update(top1=result["top1"], epoch=epoch)
                    record = {"epoch": epoch, "step": step, "lr": lr,
                              **{f"train_{n}": v for n, v in trackers[k].means().items()
                                 if n != "lr"},
                              **result, "images_per_sec": images_per_sec,
                              "epoch_seconds": seconds}
                    writers[k].write(record)
                    log_main(f"{workdir.name}/student_{k} epoch {epoch}/{config.epochs}: loss "
                             f"{record['train_loss']:.4f} top1 {result['top1']:.2f} "
                             f"(best {best[k]['top1']:.2f} @ {best[k]['epoch']})")
                write_summaries(finished=False)
            step_due = config.checkpoint_every_steps > 0 and (
                step % config.checkpoint_every_steps == 0)
            if (epoch % config.checkpoint_every_epochs == 0 or epoch == config.epochs
                    or any(is_best) or step_due or step >= stop_at):
                save(epoch, is_best)
        finished = step >= total_steps
        results = write_summaries(finished)
        if finished and config.export:
            for k, d in enumerate(dirs):
                if not (d / ckpt_lib.EXPORT).exists():
                    ckpt_lib.export_variables(
                        d, to_host(student_variables(multi_student.unstack_state(stacked, k,
                                                                                 mesh))),
                        arch=config.student.arch, dataset=model_dataset,
                        num_classes=info.num_classes)
        return {"students": results}
    finally:
        for w in writers:
            w.close()
        for c in checkpointers:
            c.close()

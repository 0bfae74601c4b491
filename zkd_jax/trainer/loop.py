"""The epoch loop every run goes through, for one student or for K trained in one program.

``run_epochs(cohort, settings, ...)`` trains from the cohort's current step to the end (or to
``settings.max_steps``), epoch after epoch:

1. train (:func:`_train_epoch`): the feed's batches through the jitted step (:func:`epoch_calls`),
   metrics fetched every ``settings.log_every_steps`` (progress bar, NaN/inf check; the newest
   ``LOG_LAG_STEPS`` calls wait for the next fetch, so the device's queue never drains;
   checkpoints and epoch ends fetch all: ``zkd_jax.trainer.epoch_metrics``), a checkpoint every
   ``checkpoint_every_steps`` and after a preemption notice;
2. evaluate when due (:func:`_evaluate_epoch`), per student;
3. checkpoint when due, then ``metrics.jsonl`` / TensorBoard / ``summary.json``
   (``zkd_jax.trainer.bookkeeping.Books``: best and last, held records, the order of the writes);

and at the end the summaries and the export. A ``zkd_jax.trainer.cohort.Cohort`` says how the
students live in the state: one plain ``TrainState`` (``OneStudent``) or K stacked ones
(``StudentStack``); ``zkd_jax.trainer.setup`` builds both. :class:`LoopSettings` holds the few
values of the config the loop needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from zkd_jax.data import plan as plan_lib
from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import metrics as metrics_io
from zkd_jax.parallel import replicate, to_host
from zkd_jax.step.scan import make_scanned_step
from zkd_jax.step.state import student_variables
from zkd_jax.trainer import faults
from zkd_jax.trainer.bookkeeping import Books, log_main
from zkd_jax.trainer.cohort import Cohort
from zkd_jax.trainer.epoch_metrics import EpochFetch, NonFiniteLossError
from zkd_jax.trainer.preemption import Preempted, PreemptionWatch
from zkd_jax.trainer.profile import StepProfiler


#: A log-only metrics fetch leaves the newest ``LOG_LAG_STEPS`` calls (steps, or scans of
#: ``config.steps_per_call`` steps) pending, so the host waits for a call already behind the
#: device's queue and the device never runs dry during the fetch. Checkpoints and epoch ends fetch
#: everything (the NaN/inf check precedes every save).
LOG_LAG_STEPS = 4

#: One call of an epoch: (steps it runs, ``run(state) -> (state, metrics)``). A call of more than
#: one step is a scan: its metrics carry a leading ``[steps]`` axis.
Call = tuple[int, Callable[[Any], tuple[Any, dict]]]


def epoch_calls(cohort: Cohort, feed, teacher_variables, *, epoch: int, epoch_arr,
                start: int, end: int, steps_per_epoch: int, steps_per_call: int,
                checkpoint_every: int, scanned: Callable | None = None) -> Iterator[Call]:
    """The calls that take the global step count from ``start`` to ``end`` inside ``epoch``.

    ``steps_per_call == 1``: one jitted step per batch of ``feed.train``. Otherwise scans of
    ``steps_per_call`` steps (``scanned``, from ``zkd_jax.step.scan.make_scanned_step``) that build
    their batches from ``feed.device``, and single steps where ``zkd_jax.data.plan.plan`` says so.
    """
    epoch_start = (epoch - 1) * steps_per_epoch

    def single(batch) -> Call:
        return 1, lambda st: cohort.train_step(st, teacher_variables, batch, epoch_arr)

    if steps_per_call == 1:
        for batch in itertools.islice(feed.train(epoch, start - epoch_start), end - start):
            yield single(batch)
        return
    split = feed.device
    order = split.order(epoch_arr)
    step = start
    for size in plan_lib.plan(start, end, epoch_start=epoch_start, n=steps_per_call,
                                checkpoint_every=checkpoint_every):
        local = step - epoch_start
        if size == 1:
            yield single(split.batch(epoch_arr, order, local))
        else:
            first = split.put(local)
            yield size, lambda st, f=first: scanned(
                st, teacher_variables, split.images, split.labels, split.key, epoch_arr, f, order)
        step += size


def evaluate(eval_step, variables, feed) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy on the test split (padded rows masked)."""
    totals = {"correct1": 0, "correct5": 0, "count": 0, "ce_sum": 0.0}
    outs = [eval_step(variables, batch) for batch in feed.eval()]  # dispatched back to back
    for out in to_host(outs):  # one wait
        for k in totals:
            totals[k] += out[k].item()
    n = max(totals["count"], 1)
    return {
        "top1": 100.0 * totals["correct1"] / n,
        "top5": 100.0 * totals["correct5"] / n,
        "test_loss": totals["ce_sum"] / n,
        "test_examples": totals["count"],
    }


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The values of a run's config that the epoch loop reads (``zkd_jax.trainer.setup``).

    Attributes:
      epochs, max_steps (0: no limit), batch_size (global), log_every_steps,
      checkpoint_every_steps (0: off), checkpoint_every_epochs, eval_every_epochs,
      progress_bar, profile_steps, profile_start_step: the config fields of
      the same names (``profile_steps > 0``: a ``jax.profiler`` trace of that many steps, starting
      ``profile_start_step`` steps into the run, in ``<workdir>/profile``; :mod:`.profile`).
      lr_for_epoch: the learning rate of an epoch (logged in ``metrics.jsonl``).
      paper_top1: the paper's result for the run (``summary.json``), or None.
    """

    epochs: int
    max_steps: int
    batch_size: int
    log_every_steps: int
    checkpoint_every_steps: int
    checkpoint_every_epochs: int
    eval_every_epochs: int
    progress_bar: bool
    lr_for_epoch: Callable[[int], float]
    paper_top1: float | None = None
    profile_steps: int = 0
    profile_start_step: int = 2


def _refresh_export(directory: epath.Path, export: Callable, variables: Callable,
                    step: int, *, trained: bool) -> None:
    """Writes ``directory/export`` at the end of a run: always when this invocation ``trained``
    (e.g. past an older end: the export is stale), and when a rerun of the finished run finds it
    missing or damaged (``variables()``: the final state's, from the last checkpoint)."""
    if not trained:
        damage = ckpt_lib.export_damage(directory)  # every process: all take part in the write
        if damage is None:
            return
        if damage != "it is missing":
            log_main(f"{directory / ckpt_lib.EXPORT} is damaged ({damage}); writing it again "
                     f"from checkpoint {step}")
    export(directory, variables())


def run_epochs(
    cohort: Cohort,
    settings: LoopSettings,
    *,
    workdir: epath.Path,
    feed,
    teacher_variables,
    eval_step,
    mesh,
    steps_per_epoch: int,
    export: Callable[[epath.Path, Any], None] | None,
) -> list[dict]:
    """Trains ``cohort`` to the end (or ``settings.max_steps``); returns one summary per student.

    Raises:
      NonFiniteLossError: a loss became NaN/inf (the last good checkpoints are kept).
      RuntimeError: the feed ended before ``steps_per_epoch`` batches.
      Preempted: a preemption notice (SIGTERM; ``zkd_jax.trainer.preemption``) stopped the run
        after the next step, once its checkpoint was on disk.
    """
    try:
        with PreemptionWatch() as watch:
            return _run_epochs(cohort, settings, watch, workdir=workdir, feed=feed,
                               teacher_variables=teacher_variables, eval_step=eval_step,
                               mesh=mesh, steps_per_epoch=steps_per_epoch, export=export)
    except Exception:
        if jax.process_index() == 0:  # a failed save leaves orbax's temporary directory
            faults.remove_partial_checkpoints(cohort.dirs)
        raise


@dataclasses.dataclass(frozen=True)
class _EpochRun:
    """How the training part of an epoch ended (:func:`_train_epoch`).

    Attributes:
      step: the global step count reached.
      preempted: a preemption notice stopped it (a checkpoint was started if inside the epoch).
      trackers: each student's ``zkd_jax.trainer.epoch_metrics.EpochMetrics`` (all fetched).
      start_step, seconds: where this invocation started the epoch and how long it trained.
    """

    step: int
    preempted: bool
    trackers: list
    start_step: int
    seconds: float


def _on_checkpoint_step(settings: LoopSettings, step: int) -> bool:
    """Whether ``config.checkpoint_every_steps`` asks for a checkpoint at ``step``."""
    every = settings.checkpoint_every_steps
    return every > 0 and step % every == 0


def _train_epoch(cohort: Cohort, books: Books, settings: LoopSettings, watch: PreemptionWatch,
                 profiler: StepProfiler, calls: Iterator[Call], *, step: int, epoch: int,
                 epoch_end: int, steps_per_epoch: int) -> _EpochRun:
    """Runs ``calls`` from global ``step`` (up to ``epoch_end``): every ``log_every_steps`` a
    metrics fetch (all but the newest ``LOG_LAG_STEPS`` calls) for the progress bar, every
    ``checkpoint_every_steps`` a full fetch and a checkpoint, and after a preemption notice a
    checkpoint inside the epoch with its running sums, then the end of the calls. The metrics of
    every step are fetched (NaN/inf checked) before it returns."""
    fetch = EpochFetch(cohort, epoch=epoch, step=step)  # a resume inside: its first part's sums
    progress = metrics_io.Progress(
        epoch=epoch, epochs=settings.epochs, total=steps_per_epoch,
        initial=step % steps_per_epoch, enabled=books.is_main and settings.progress_bar,
    )
    start_time, start_step, preempted = time.perf_counter(), step, False
    for count, run in calls:
        profiler.before(step)
        cohort.state, metrics = run(cohort.state)
        profiler.after(count, cohort.state)
        step += count
        fetch.add(count, metrics)
        faults.hit("after_step", step)
        preempted = watch.stop_after(count)
        every = settings.log_every_steps
        log_now = step // every != (step - count) // every or step == epoch_end
        ckpt_now = _on_checkpoint_step(settings, step)
        if log_now or ckpt_now:
            full = ckpt_now or step == epoch_end
            n_new = fetch.fetch(step, keep=0 if full else min(LOG_LAG_STEPS, len(fetch)))
            rate = (step - start_step) * settings.batch_size / (time.perf_counter() - start_time)
            progress.update(n_new, **fetch.shown(), img_s=rate)
        if (ckpt_now or preempted) and step < epoch_end:
            if preempted and not ckpt_now:
                fetch.fetch(step)  # the epoch's sums so far go into the checkpoint
            books.save(step, epoch, trackers=fetch.trackers)
        if preempted:
            break
    fetch.fetch(step)
    progress.close()
    return _EpochRun(step=step, preempted=preempted, trackers=fetch.trackers,
                     start_step=start_step, seconds=time.perf_counter() - start_time)


def _evaluate_epoch(cohort: Cohort, books: Books, settings: LoopSettings, *, eval_step, feed,
                    epoch: int, run: _EpochRun) -> list[bool]:
    """Evaluates every student at the end of ``epoch`` and books it (its record held for the
    epoch's checkpoint); returns, per student, whether it is its best so far."""
    images_per_sec = (run.step - run.start_step) * settings.batch_size / max(run.seconds, 1e-9)
    lr = settings.lr_for_epoch(epoch)
    is_best = []
    for k in range(cohort.size):
        eval_start = time.perf_counter()
        result = evaluate(eval_step, student_variables(cohort.student_state(k)), feed)
        result["eval_seconds"] = time.perf_counter() - eval_start
        is_best.append(books.evaluated(
            k, result, epoch=epoch, step=run.step, lr=lr, train=run.trackers[k].means(),
            images_per_sec=images_per_sec, epoch_seconds=run.seconds))
    return is_best


def _scanned_step(cohort: Cohort, feed, mesh, steps_per_call: int) -> Callable | None:
    """The one compiled scan of ``steps_per_call`` steps of the run (None: single steps)."""
    if steps_per_call == 1:
        return None
    return make_scanned_step(cohort.train_step.unjitted, mesh, steps_per_call, feed.device.build)


def _refresh_exports(cohort: Cohort, export: Callable, step: int, *, trained: bool) -> None:
    """Every student's export at the end of a finished run (:func:`_refresh_export`)."""
    for k, d in enumerate(cohort.dirs):
        _refresh_export(d, export, lambda k=k: to_host(student_variables(cohort.student_state(k))),
                        step, trained=trained)


def _run_epochs(cohort: Cohort, settings: LoopSettings, watch: PreemptionWatch, *, workdir, feed,
                teacher_variables, eval_step, mesh, steps_per_epoch: int, export) -> list[dict]:
    """``run_epochs`` under a :class:`PreemptionWatch`: epoch after epoch, train
    (:func:`_train_epoch`), evaluate when due (:func:`_evaluate_epoch`), checkpoint when due, and
    at the end the summaries and the export."""
    steps_per_call = feed.steps_per_call  # checked by zkd_jax.data.make_feed
    scanned = _scanned_step(cohort, feed, mesh, steps_per_call)
    step = int(np.ravel(to_host(cohort.state.step))[0])  # one student, or K at the same step
    first_step = step
    total_steps = settings.epochs * steps_per_epoch
    stop_at = min(total_steps, settings.max_steps) if settings.max_steps > 0 else total_steps
    profiler = StepProfiler(workdir / "profile", steps=settings.profile_steps,
                            start=settings.profile_start_step)
    books = Books(cohort, workdir=workdir, step=step, epochs=settings.epochs,
                  paper_top1=settings.paper_top1)
    try:
        while step < stop_at:
            epoch = step // steps_per_epoch + 1
            epoch_end = min(epoch * steps_per_epoch, stop_at)
            epoch_arr = replicate(np.int32(epoch), mesh)
            calls = epoch_calls(
                cohort, feed, teacher_variables, epoch=epoch, epoch_arr=epoch_arr,
                start=step, end=epoch_end, steps_per_epoch=steps_per_epoch,
                steps_per_call=steps_per_call, checkpoint_every=settings.checkpoint_every_steps,
                scanned=scanned)
            run = _train_epoch(cohort, books, settings, watch, profiler, calls, step=step,
                               epoch=epoch, epoch_end=epoch_end, steps_per_epoch=steps_per_epoch)
            step = run.step
            if run.preempted and step < epoch_end:  # its checkpoint was started inside
                books.publish(step)
                raise Preempted(step, str(workdir))
            if step < epoch_end:
                raise RuntimeError(
                    f"the input pipeline ended after step {step} of epoch {epoch}, before the "
                    f"{steps_per_epoch} steps per epoch that data.steps_per_epoch promised.")
            if step < epoch * steps_per_epoch:  # stopped inside the epoch (max_steps)
                books.save(step, epoch, trackers=run.trackers)
                break
            is_best = [False] * cohort.size
            if epoch % settings.eval_every_epochs == 0 or epoch == settings.epochs:
                is_best = _evaluate_epoch(cohort, books, settings, eval_step=eval_step,
                                          feed=feed, epoch=epoch, run=run)
            if (epoch % settings.checkpoint_every_epochs == 0 or epoch == settings.epochs
                    or any(is_best) or _on_checkpoint_step(settings, step) or step >= stop_at
                    or run.preempted):
                books.save(step, epoch, is_best=is_best)
                books.publish(step)
            if run.preempted and step < stop_at:
                raise Preempted(step, str(workdir))
        results = books.publish(step, finished=step >= total_steps)
        if step >= total_steps and export is not None:
            _refresh_exports(cohort, export, step, trained=step > first_step)
        return results
    finally:
        profiler.stop(cohort.state)
        books.close()


__all__ = ["LOG_LAG_STEPS", "Cohort", "LoopSettings", "NonFiniteLossError", "epoch_calls",
           "evaluate", "log_main", "run_epochs", "to_host"]

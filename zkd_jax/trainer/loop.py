"""The epoch loop every run goes through, for one student or for K trained in one program.

``run_epochs(cohort, settings, ...)`` trains from the cohort's current step to the end (or to
``settings.max_steps``): per epoch, the feed's batches through the jitted step, metrics fetched every
``settings.log_every_steps`` (progress bar, NaN/inf check; the newest ``LOG_LAG_STEPS`` steps wait
for the next fetch, so the device's queue never drains; checkpoints and epoch ends fetch all),
then per student: evaluation, ``metrics.jsonl`` / TensorBoard / ``summary.json``, orbax
checkpoints (the best one kept apart) and, at the end, the export. A :class:`Cohort` says how the
students live in the state: one plain ``TrainState`` or K stacked ones (``zkd_jax.trainer.setup``
builds both). :class:`LoopSettings` holds the few values of the config the loop needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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
from zkd_jax.step.state import TrainState, student_variables
from zkd_jax.trainer import faults
from zkd_jax.trainer.identity import run_identity
from zkd_jax.trainer.preemption import Preempted, PreemptionWatch
from zkd_jax.trainer.profile import StepProfiler


class NonFiniteLossError(FloatingPointError):
    """The training loss, the gradient norm, a teacher logit or an updated parameter became NaN
    or inf; the run stopped keeping its last good checkpoint."""


#: Step metrics that are checks, not loss terms: never averaged into ``train_*`` means.
_CHECK_METRICS = ("teacher_finite", "params_finite")


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


def log_main(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


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
      steps_per_call, progress_bar, profile_steps, profile_start_step: the config fields of
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
    steps_per_call: int
    progress_bar: bool
    lr_for_epoch: Callable[[int], float]
    paper_top1: float | None = None
    profile_steps: int = 0
    profile_start_step: int = 2


@dataclasses.dataclass
class Cohort:
    """The students of one run and how they live in the (possibly stacked) train state.

    Attributes:
      dirs: one output directory per student (a single run: the workdir itself).
      state: what ``train_step`` takes and returns.
      train_step: ``(state, teacher_variables, batch, epoch) -> (state, metrics)``.
      student_state: ``(state, k) -> TrainState`` of student ``k`` (to save, evaluate, export).
      split_metrics: one step's fetched metrics -> one dict of floats per student.
      checkpointers: one ``zkd_jax.io.checkpoint.Checkpointer`` per student.
      metas: the restored checkpoint metadata per student (``{}`` on a fresh start).
      summary_fields: extra ``summary.json`` fields per student (its config, seeds).
      write_top_summary: K students: writes ``workdir/summary.json`` from the K summaries.
      identity: per student, the fields every checkpoint's metadata stores besides the loop's
        (the run's config and its history of changes: ``zkd_jax.trainer.identity``); its
        ``config_history`` is shown in ``summary.json`` too.
    """

    dirs: list[epath.Path]
    state: Any
    train_step: Callable
    student_state: Callable[[Any, int], TrainState]
    split_metrics: Callable[[dict], list[dict]]
    checkpointers: list
    metas: list[dict]
    summary_fields: list[dict]
    write_top_summary: Callable[[list[dict], bool, int], None] | None = None
    identity: list[dict] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.dirs)


class _EpochMetrics:
    """Averages one student's step metrics over an epoch, checking every loss for NaN/inf."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}

    def restore(self, meta: dict, step: int) -> None:
        """Takes over the sums of a checkpoint written inside this epoch at ``step``."""
        if meta.get("step") == step and meta.get("epoch_count"):
            self.sums = {k: float(v) for k, v in meta["epoch_sums"].items()}
            self.count = int(meta["epoch_count"])

    def state(self) -> dict:
        """The running sums, for a checkpoint's metadata (JSON keeps Python floats exactly)."""
        return {"epoch_sums": dict(self.sums), "epoch_count": self.count}

    def add(self, fetched: list[dict], *, first_step: int, epoch: int, workdir, checkpointer):
        for i, m in enumerate(fetched):
            bad = _non_finite(m)
            if bad:
                kept = checkpointer.latest_step()
                where = (f"The last good checkpoint (step {kept}) is kept in {workdir}/checkpoints:"
                         " lower config.optimizer.lr or check the data and the teacher, then rerun "
                         "to resume from it." if kept is not None else
                         f"No checkpoint was written yet in {workdir}: lower config.optimizer.lr or "
                         "check the data and the teacher, then rerun (it starts from scratch).")
                raise NonFiniteLossError(
                    f"{bad} at step {first_step + i} (epoch {epoch}); stopped. {where}")
            for k, v in m.items():
                if k not in _CHECK_METRICS:
                    self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.count += 1
        if fetched:
            self.last = {k: float(v) for k, v in fetched[-1].items()}

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _non_finite(m: dict) -> str | None:
    """What is not finite in one step's metrics (None: all is well)."""
    if float(m.get("teacher_finite", 1.0)) != 1.0:
        return "a teacher logit is NaN or inf (check the teacher checkpoint and the data)"
    loss = float(m["loss"])
    if not math.isfinite(loss):
        return f"training loss is {loss}"
    if "grad_norm" in m and not math.isfinite(float(m["grad_norm"])):
        return f"the gradient norm is {float(m['grad_norm'])}"
    if float(m.get("params_finite", 1.0)) != 1.0:
        return "a parameter became NaN or inf after the update"
    return None


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


def _run_epochs(cohort: Cohort, settings: LoopSettings, watch: PreemptionWatch, *, workdir, feed,
                teacher_variables, eval_step, mesh, steps_per_epoch: int, export) -> list[dict]:
    """``run_epochs`` under a :class:`PreemptionWatch`."""
    num, dirs, is_main = cohort.size, cohort.dirs, jax.process_index() == 0
    steps_per_call = plan_lib.check_steps_per_call(settings.steps_per_call, feed.pipeline)
    scanned = None
    if steps_per_call > 1:  # one compiled scan for the whole run
        split = feed.device
        scanned = make_scanned_step(cohort.train_step.unjitted, mesh, steps_per_call, split.build)
    step = int(np.ravel(to_host(cohort.state.step))[0])  # one student, or K at the same step
    first_step = step
    identity = cohort.identity or [{} for _ in range(num)]
    preempted = False
    total_steps = settings.epochs * steps_per_epoch
    stop_at = min(total_steps, settings.max_steps) if settings.max_steps > 0 else total_steps
    best = [{"top1": m.get("best_top1", -1.0), "epoch": m.get("best_epoch", 0)}
            for m in cohort.metas]
    last = [{"top1": m.get("last_top1"), "epoch": m.get("last_epoch", 0)} for m in cohort.metas]
    profiler = StepProfiler(workdir / "profile", steps=settings.profile_steps,
                            start=settings.profile_start_step)
    writers = [metrics_io.MetricsWriter(d, enabled=is_main, resume_step=step) for d in dirs]
    for k in range(num):  # stopped between a checkpoint and metrics.jsonl: the records it holds
        written = {r.get("step") for r in writers[k].records}
        for record in cohort.metas[k].get("records", []):
            if record.get("step") not in written:
                writers[k].write(record)
    names = [workdir.name] if num == 1 else [f"{workdir.name}/{d.name}" for d in dirs]
    identities = [{"run": run_identity(f["config"])} for f in cohort.summary_fields]
    for ident in identities:
        ident["seed"] = ident["run"]["seed"]

    def summaries(finished: bool) -> list[dict]:
        out = [{
            "best_top1": best[k]["top1"] if best[k]["epoch"] else None,
            "best_epoch": best[k]["epoch"], "last_top1": last[k]["top1"],
            "last_epoch": last[k]["epoch"], "step": step, "finished": finished,
            "paper_top1": settings.paper_top1, **identities[k],
            **metrics_io.run_totals(writers[k].records), **cohort.summary_fields[k],
            **({"config_history": identity[k]["config_history"]}
               if identity[k].get("config_history") else {}),
        } for k in range(num)]
        if is_main:
            for d, s in zip(dirs, out):
                metrics_io.write_summary(d, s)
            if cohort.write_top_summary is not None:
                cohort.write_top_summary(out, finished, step)
        return out

    def save(epoch: int, is_best: list[bool], trackers=None) -> None:
        """Checkpoints every student; inside an epoch (``trackers``) with its running sums."""
        for k in range(num):
            cohort.checkpointers[k].save(cohort.student_state(cohort.state, k), {
                "epoch": epoch, "best_top1": best[k]["top1"], "best_epoch": best[k]["epoch"],
                "last_top1": last[k]["top1"], "last_epoch": last[k]["epoch"],
                **(trackers[k].state() if trackers is not None else {}), **identity[k],
                "records": list(held[k]),  # metrics.jsonl's next lines, should a crash lose them
            }, best=is_best[k])
        faults.hit("after_checkpoint_save", step)

    held: list[list[dict]] = [[] for _ in range(num)]  # evaluation records awaiting a checkpoint

    def write_held() -> None:
        for k in range(num):
            for record in held[k]:
                writers[k].write(record)
            held[k].clear()

    def commit() -> None:
        """Waits until every checkpoint is on disk and verified (a failed write raises here), so
        that summary.json and metrics.jsonl never name a step without a checkpoint."""
        for c in cohort.checkpointers:
            c.wait()
        faults.hit("after_checkpoint_commit", step)

    try:
        while step < stop_at:
            epoch, offset = step // steps_per_epoch + 1, step % steps_per_epoch
            epoch_end = min(epoch * steps_per_epoch, stop_at)
            epoch_arr = replicate(np.int32(epoch), mesh)
            trackers = [_EpochMetrics() for _ in range(num)]
            for k in range(num):  # a resume inside this epoch: the sums of its first part
                trackers[k].restore(cohort.metas[k], step)
            pending: list[tuple[int, dict]] = []  # (steps, metrics) per call
            progress = metrics_io.Progress(
                epoch=epoch, epochs=settings.epochs, total=steps_per_epoch, initial=offset,
                enabled=is_main and settings.progress_bar,
            )
            start_time, start_step = time.perf_counter(), step

            def flush(keep: int = 0) -> int:
                """Fetches the pending metrics but the newest ``keep`` calls' (one host wait),
                hands them to the trackers (NaN/inf check); returns how many steps it fetched."""
                nonlocal pending
                ready, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                per_step: list[dict] = []
                for (count, _), m in zip(ready, to_host([m for _, m in ready])):
                    per_step.extend([{k: v[i] for k, v in m.items()} for i in range(count)]
                                    if count > 1 else [m])  # a scan: [count]-stacked metrics
                fetched = [cohort.split_metrics(m) for m in per_step]
                first = step - sum(c for c, _ in pending) - len(fetched) + 1
                for k in range(num):
                    trackers[k].add([f[k] for f in fetched], first_step=first, epoch=epoch,
                                    workdir=dirs[k], checkpointer=cohort.checkpointers[k])
                return len(fetched)

            calls = epoch_calls(
                cohort, feed, teacher_variables, epoch=epoch, epoch_arr=epoch_arr,
                start=step, end=epoch_end, steps_per_epoch=steps_per_epoch,
                steps_per_call=steps_per_call, checkpoint_every=settings.checkpoint_every_steps,
                scanned=scanned)
            for count, run in calls:
                profiler.before(step)
                cohort.state, metrics = run(cohort.state)
                profiler.after(count, cohort.state)
                step += count
                pending.append((count, metrics))
                faults.hit("after_step", step)
                preempted = watch.stop_after(count)
                every = settings.log_every_steps
                log_now = step // every != (step - count) // every or step == epoch_end
                ckpt_now = settings.checkpoint_every_steps > 0 and (
                    step % settings.checkpoint_every_steps == 0)
                if log_now or ckpt_now:
                    full = ckpt_now or step == epoch_end
                    n_new = flush(0 if full else min(LOG_LAG_STEPS, len(pending)))
                    rate = (step - start_step) * settings.batch_size / (
                        time.perf_counter() - start_time)
                    shown = {}
                    if trackers[0].last:  # empty until a first fetch (log_every_steps < lag)
                        shown["loss"] = float(np.mean([t.last["loss"] for t in trackers]))
                        if "lr" in trackers[0].last:
                            shown["lr"] = trackers[0].last["lr"]
                    progress.update(n_new, **shown, img_s=rate)
                if (ckpt_now or preempted) and step < epoch_end:
                    if preempted and not ckpt_now:
                        flush()  # the epoch's sums so far go into the checkpoint
                    save(epoch, [False] * num, trackers)
                if preempted:
                    break
            flush()
            progress.close()
            seconds = time.perf_counter() - start_time
            if preempted and step < epoch_end:
                commit()
                write_held()
                summaries(finished=False)
                raise Preempted(step, str(workdir))
            if step < epoch_end:
                raise RuntimeError(
                    f"the input pipeline ended after step {step} of epoch {epoch}, before the "
                    f"{steps_per_epoch} steps per epoch that data.steps_per_epoch promised.")
            if step < epoch * steps_per_epoch:  # stopped inside the epoch (max_steps)
                save(epoch, [False] * num, trackers)
                break
            images_per_sec = (step - start_step) * settings.batch_size / max(seconds, 1e-9)
            is_best = [False] * num
            if epoch % settings.eval_every_epochs == 0 or epoch == settings.epochs:
                lr = settings.lr_for_epoch(epoch)
                for k in range(num):
                    eval_start = time.perf_counter()
                    variables = student_variables(cohort.student_state(cohort.state, k))
                    result = evaluate(eval_step, variables, feed)
                    result["eval_seconds"] = time.perf_counter() - eval_start
                    last[k].update(top1=result["top1"], epoch=epoch)
                    is_best[k] = result["top1"] > best[k]["top1"]
                    if is_best[k]:
                        best[k].update(top1=result["top1"], epoch=epoch)
                    record = {"epoch": epoch, "step": step, "lr": lr,
                              **{f"train_{n}": v for n, v in trackers[k].means().items()
                                 if n != "lr"},
                              **result, "images_per_sec": images_per_sec,
                              "epoch_seconds": seconds, "run": identities[k]["run"]}
                    held[k].append(record)  # written once this epoch's checkpoint is on disk
                    log_main(f"{names[k]} epoch {epoch}/{settings.epochs}: loss "
                             f"{record['train_loss']:.4f} top1 {result['top1']:.2f} top5 "
                             f"{result['top5']:.2f} (best {best[k]['top1']:.2f} @ "
                             f"{best[k]['epoch']}), {images_per_sec:.0f} img/s")
            step_due = settings.checkpoint_every_steps > 0 and (
                step % settings.checkpoint_every_steps == 0)
            if (epoch % settings.checkpoint_every_epochs == 0 or epoch == settings.epochs
                    or any(is_best) or step_due or step >= stop_at or preempted):
                save(epoch, is_best)
                commit()
                write_held()
                summaries(finished=False)
            if preempted and step < stop_at:
                raise Preempted(step, str(workdir))
        commit()
        write_held()
        finished = step >= total_steps
        results = summaries(finished)
        if finished and export is not None:
            for k, d in enumerate(dirs):
                _refresh_export(d, export, lambda k=k: to_host(
                    student_variables(cohort.student_state(cohort.state, k))), step,
                    trained=step > first_step)
        return results
    finally:
        profiler.stop(cohort.state)
        for w in writers:
            w.close()
        for c in cohort.checkpointers:
            c.close()

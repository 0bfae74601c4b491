"""A run's books across epochs, per student: best and last evaluation, records, checkpoints.

:class:`Books` keeps what the epoch loop (``zkd_jax.trainer.loop``) writes besides the train state:
each student's best and last top-1, the evaluation records of ``metrics.jsonl`` (and TensorBoard),
``summary.json``, and the orbax checkpoints whose metadata carry all of it.

The order of the writes is what makes a crash at any moment recoverable: an evaluation record is
*held* (:meth:`Books.evaluated`) and stored in the next checkpoint's metadata (:meth:`Books.save`);
only once every checkpoint is on disk (:meth:`Books.commit`) do ``metrics.jsonl`` and
``summary.json`` get it (:meth:`Books.publish`). A run stopped between the two finds the held
records in the checkpoint it resumes from and writes them first.
"""

from __future__ import annotations

import jax
from etils import epath

from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import faults
from zkd_jax.trainer.cohort import Cohort
from zkd_jax.trainer.identity import run_identity


def log_main(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


class Books:
    """The per-student bookkeeping of one run of ``cohort`` (see the module docstring).

    Opening them (at global step ``step``: the run's first) opens each student's metrics writer,
    keeping the records up to ``step``, and writes the records a checkpoint held that the files
    lack (the run stopped between that checkpoint and ``metrics.jsonl``).

    Attributes:
      best, last: per student, ``{"top1", "epoch"}`` of the best and the newest evaluation
        (epoch 0: none yet), restored from the checkpoint's metadata.
      held: per student, the evaluation records that wait for their checkpoint to be on disk.
      writers: per student, its ``zkd_jax.io.metrics.MetricsWriter`` (writing on process 0).
    """

    def __init__(self, cohort: Cohort, *, workdir: epath.Path, step: int, epochs: int,
                 paper_top1: float | None):
        num = cohort.size
        self.cohort, self.epochs, self.paper_top1 = cohort, epochs, paper_top1
        self.is_main = jax.process_index() == 0
        self.identity = cohort.identity or [{} for _ in range(num)]
        self.best = [{"top1": m.get("best_top1", -1.0), "epoch": m.get("best_epoch", 0)}
                     for m in cohort.metas]
        self.last = [{"top1": m.get("last_top1"), "epoch": m.get("last_epoch", 0)}
                     for m in cohort.metas]
        self.writers = [metrics_io.MetricsWriter(d, enabled=self.is_main, resume_step=step)
                        for d in cohort.dirs]
        for writer, meta in zip(self.writers, cohort.metas):
            written = {r.get("step") for r in writer.records}
            for record in meta.get("records", []):
                if record.get("step") not in written:
                    writer.write(record)
        self.names = [workdir.name] if num == 1 else [f"{workdir.name}/{d.name}"
                                                       for d in cohort.dirs]
        self.runs = [{"run": run_identity(f["config"])} for f in cohort.summary_fields]
        for ident in self.runs:
            ident["seed"] = ident["run"]["seed"]
        self.held: list[list[dict]] = [[] for _ in range(num)]

    def evaluated(self, k: int, result: dict, *, epoch: int, step: int, lr: float,
                  train: dict[str, float], images_per_sec: float, epoch_seconds: float) -> bool:
        """Books student ``k``'s evaluation at the end of ``epoch`` (``result``: its top-1, top-5,
        test loss; ``train``: the epoch's mean step metrics); holds its record for the next
        checkpoint and prints a line. Returns whether it is the student's best so far."""
        best, last = self.best[k], self.last[k]
        last.update(top1=result["top1"], epoch=epoch)
        is_best = result["top1"] > best["top1"]
        if is_best:
            best.update(top1=result["top1"], epoch=epoch)
        record = {"epoch": epoch, "step": step, "lr": lr,
                  **{f"train_{n}": v for n, v in train.items() if n != "lr"},
                  **result, "images_per_sec": images_per_sec,
                  "epoch_seconds": epoch_seconds, "run": self.runs[k]["run"]}
        self.held[k].append(record)  # written once this epoch's checkpoint is on disk
        log_main(f"{self.names[k]} epoch {epoch}/{self.epochs}: loss "
                 f"{record['train_loss']:.4f} top1 {result['top1']:.2f} top5 "
                 f"{result['top5']:.2f} (best {best['top1']:.2f} @ "
                 f"{best['epoch']}), {images_per_sec:.0f} img/s")
        return is_best

    def save(self, step: int, epoch: int, *, is_best: list[bool] | None = None,
             trackers: list | None = None) -> None:
        """Starts a checkpoint of every student at ``step`` (``is_best``: also kept as the best);
        inside an epoch (``trackers``: ``zkd_jax.trainer.epoch_metrics.EpochMetrics``) with the
        epoch's running sums. The held records go into its metadata."""
        for k in range(self.cohort.size):
            self.cohort.checkpointers[k].save(self.cohort.student_state(k), {
                "epoch": epoch, "best_top1": self.best[k]["top1"],
                "best_epoch": self.best[k]["epoch"], "last_top1": self.last[k]["top1"],
                "last_epoch": self.last[k]["epoch"],
                **(trackers[k].state() if trackers is not None else {}), **self.identity[k],
                # metrics.jsonl's next lines, should a crash lose them:
                "records": list(self.held[k]),
            }, best=is_best[k] if is_best is not None else False)
        faults.hit("after_checkpoint_save", step)

    def commit(self, step: int) -> None:
        """Waits until every checkpoint is on disk and verified (a failed write raises here), so
        that summary.json and metrics.jsonl never name a step without a checkpoint."""
        for c in self.cohort.checkpointers:
            c.wait()
        faults.hit("after_checkpoint_commit", step)

    def write_held(self) -> None:
        """Writes the held records to ``metrics.jsonl`` (their checkpoint is on disk)."""
        for writer, held in zip(self.writers, self.held):
            for record in held:
                writer.write(record)
            held.clear()

    def summaries(self, step: int, finished: bool) -> list[dict]:
        """Each student's summary at ``step``, written to its ``summary.json`` (and, for K
        students, the run's top-level one) on process 0."""
        out = [{
            "best_top1": best["top1"] if best["epoch"] else None,
            "best_epoch": best["epoch"], "last_top1": last["top1"],
            "last_epoch": last["epoch"], "step": step, "finished": finished,
            "paper_top1": self.paper_top1, **run,
            **metrics_io.run_totals(writer.records), **fields,
            **({"config_history": ident["config_history"]}
               if ident.get("config_history") else {}),
        } for best, last, run, writer, fields, ident in zip(
            self.best, self.last, self.runs, self.writers, self.cohort.summary_fields,
            self.identity)]
        if self.is_main:
            for d, s in zip(self.cohort.dirs, out):
                metrics_io.write_summary(d, s)
            self.cohort.write_top_summary(out, finished, step)
        return out

    def publish(self, step: int, *, finished: bool = False) -> list[dict]:
        """Once the checkpoints are on disk (:meth:`commit`), the held records and the summaries
        (:meth:`write_held`, :meth:`summaries`); returns the summaries."""
        self.commit(step)
        self.write_held()
        return self.summaries(step, finished)

    def close(self) -> None:
        """Closes the metrics writers, then the checkpointers."""
        for w in self.writers:
            w.close()
        for c in self.cohort.checkpointers:
            c.close()


__all__ = ["Books", "log_main"]

"""One epoch's step metrics: dispatched calls waiting for a host fetch, and each student's means.

The epoch loop (``zkd_jax.trainer.loop``) hands every call's metrics (still on the device) to an
:class:`EpochFetch` and fetches them when it logs or checkpoints, all at once (one host wait) or
all but the newest few calls (so the device's queue never drains while the host waits). Each
fetched step goes, per student, to an :class:`EpochMetrics`, which checks it for NaN/inf and adds
it to the epoch's running sums; those sums go into a mid-epoch checkpoint's metadata and come back
on a resume inside the epoch, so the epoch's means are the same as an uninterrupted run's.
"""

from __future__ import annotations

import math

import numpy as np

from zkd_jax.parallel import to_host


class NonFiniteLossError(FloatingPointError):
    """The training loss, the gradient norm, a teacher logit or an updated parameter became NaN
    or inf; the run stopped keeping its last good checkpoint."""


#: Step metrics that are checks, not loss terms: never averaged into ``train_*`` means.
_CHECK_METRICS = ("teacher_finite", "params_finite")


class EpochMetrics:
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
        """Adds the steps ``first_step, first_step + 1, ...`` (host floats, one dict a step).

        Raises:
          NonFiniteLossError: a step's metrics are not finite (the message names the step and
            the checkpoint a rerun resumes from).
        """
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
        """Each metric's mean over the steps added so far."""
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


class EpochFetch:
    """The calls of one epoch whose metrics are not fetched yet, and the students' trackers.

    Attributes:
      trackers: one :class:`EpochMetrics` per student of ``cohort`` (a resume at ``step`` inside
        the epoch starts them from the checkpoint's sums).
    """

    def __init__(self, cohort, *, epoch: int, step: int):
        self.cohort, self.epoch = cohort, epoch
        self.trackers = [EpochMetrics() for _ in range(cohort.size)]
        for k, tracker in enumerate(self.trackers):
            tracker.restore(cohort.metas[k], step)
        self.pending: list[tuple[int, dict]] = []  # (steps, metrics) per call

    def __len__(self) -> int:
        """How many calls wait for a fetch."""
        return len(self.pending)

    def add(self, count: int, metrics: dict) -> None:
        """A call of ``count`` steps was dispatched; ``metrics`` are its (device) metrics, with a
        leading ``[count]`` axis when it was a scan."""
        self.pending.append((count, metrics))

    def fetch(self, step: int, keep: int = 0) -> int:
        """Fetches the pending metrics but the newest ``keep`` calls' (one host wait), the global
        step count being ``step``; hands them to the trackers (NaN/inf check); returns how many
        steps it fetched.

        Raises:
          NonFiniteLossError: see :meth:`EpochMetrics.add`.
        """
        cut = len(self.pending) - keep
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        per_step: list[dict] = []
        for (count, _), m in zip(ready, to_host([m for _, m in ready])):
            per_step.extend([{k: v[i] for k, v in m.items()} for i in range(count)]
                            if count > 1 else [m])  # a scan: [count]-stacked metrics
        fetched = [self.cohort.split_metrics(m) for m in per_step]
        first = step - sum(c for c, _ in self.pending) - len(fetched) + 1
        for k, tracker in enumerate(self.trackers):
            tracker.add([f[k] for f in fetched], first_step=first, epoch=self.epoch,
                        workdir=self.cohort.dirs[k], checkpointer=self.cohort.checkpointers[k])
        return len(fetched)

    def shown(self) -> dict[str, float]:
        """What the progress bar shows: the students' mean loss and the learning rate of the
        newest fetched step (nothing before a first fetch)."""
        shown = {}
        first = self.trackers[0].last
        if first:
            shown["loss"] = float(np.mean([t.last["loss"] for t in self.trackers]))
            if "lr" in first:
                shown["lr"] = first["lr"]
        return shown


__all__ = ["EpochFetch", "EpochMetrics", "NonFiniteLossError"]

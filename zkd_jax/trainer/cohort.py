"""The students of one run and how they live in the train state: one student, or a stack of K.

A :class:`Cohort` is what the epoch loop (``zkd_jax.trainer.loop``) trains: the state the jitted
step takes and returns, one output directory and one checkpointer per student, and what a resume
restored. Its two kinds differ in three answers only:

- :class:`OneStudent`: the state *is* the student's ``TrainState``; one step's metrics are the
  student's; the workdir's ``summary.json`` is the student's own.
- :class:`StudentStack`: K students of one architecture trained in one program
  (``zkd_jax.step.multi``): every leaf of the state has a leading ``[K]`` axis, student ``k`` is
  taken out by a jitted slice (to save, evaluate, export), one step's metrics are ``[K]``-stacked,
  and ``workdir/summary.json`` lists the K students' summaries above their own
  ``student_<k>/summary.json``.

``zkd_jax.trainer.setup`` builds both from a config.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

from etils import epath

from zkd_jax.io import metrics as metrics_io
from zkd_jax.step import StateStack
from zkd_jax.step.state import TrainState


@dataclasses.dataclass(kw_only=True)
class Cohort(abc.ABC):
    """The students of one run (see the module docstring for the two kinds).

    Attributes:
      dirs: one output directory per student (a single run: the workdir itself).
      state: what ``train_step`` takes and returns.
      train_step: ``(state, teacher_variables, batch, epoch) -> (state, metrics)``.
      checkpointers: one ``zkd_jax.io.checkpoint.Checkpointer`` per student.
      metas: the restored checkpoint metadata per student (``{}`` on a fresh start).
      summary_fields: extra ``summary.json`` fields per student (its config, seeds).
      identity: per student, the fields every checkpoint's metadata stores besides the loop's
        (the run's config and its history of changes: ``zkd_jax.trainer.identity``); its
        ``config_history`` is shown in ``summary.json`` too.
    """

    dirs: list[epath.Path]
    state: Any
    train_step: Callable
    checkpointers: list
    metas: list[dict]
    summary_fields: list[dict]
    identity: list[dict] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        """How many students (K)."""
        return len(self.dirs)

    @abc.abstractmethod
    def student_state(self, k: int) -> TrainState:
        """Student ``k``'s plain ``TrainState`` out of the current state."""

    @abc.abstractmethod
    def split_metrics(self, metrics: dict) -> list[dict]:
        """One step's fetched metrics -> one dict per student."""

    def write_top_summary(self, summaries: list[dict], finished: bool, step: int) -> None:
        """Writes what the run's workdir shows above the students' own summaries (nothing for
        one student, whose summary is the workdir's)."""


@dataclasses.dataclass(kw_only=True)
class OneStudent(Cohort):
    """One student: the state is its ``TrainState``, its outputs are the workdir's.

    >>> OneStudent(dirs=[epath.Path("/tmp/run")], state=None, train_step=None,
    ...            checkpointers=[], metas=[{}], summary_fields=[{}]).split_metrics({"loss": 1.0})
    [{'loss': 1.0}]
    """

    def student_state(self, k: int) -> TrainState:
        return self.state

    def split_metrics(self, metrics: dict) -> list[dict]:
        return [metrics]


@dataclasses.dataclass(kw_only=True)
class StudentStack(Cohort):
    """K students stacked on a leading axis of every leaf of the state.

    Attributes (besides :class:`Cohort`'s):
      stack: the run's ``zkd_jax.step.StateStack`` (its jitted slice takes student ``k`` out).
      workdir: where the top-level ``summary.json`` goes (the students' dirs are below it).
      config: the run's config as a dict, shown in the top-level ``summary.json``.
    """

    stack: StateStack
    workdir: epath.Path
    config: dict

    def student_state(self, k: int) -> TrainState:
        return self.stack.take(self.state, k)

    def split_metrics(self, metrics: dict) -> list[dict]:
        return [{key: v[k] for key, v in metrics.items()} for k in range(self.size)]

    def write_top_summary(self, summaries: list[dict], finished: bool, step: int) -> None:
        """``workdir/summary.json``: the K summaries (without their configs), the run's state
        and its config."""
        metrics_io.write_summary(self.workdir, {
            "students": [{k: v for k, v in s.items() if k != "config"} for s in summaries],
            "finished": finished, "step": step, "config": self.config})


__all__ = ["Cohort", "OneStudent", "StudentStack"]

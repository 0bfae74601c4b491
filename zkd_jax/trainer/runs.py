"""The one door of a run: ``train_and_evaluate(config, workdir)``, what ``zkd-train`` runs.

What a config runs, read top to bottom in :func:`train_and_evaluate`:

1. the config is checked (``zkd_jax.trainer.validate``) and ``jax.distributed`` started where the
   config or the environment asks (the process index is known from here on);
2. the workdir is locked for the whole run (``zkd_jax.io.lock``; process 0 holds the lock);
3. a config with a non-empty ``suite`` (the demo) trains its teacher once and each listed student
   in ``workdir/NAME``, then prints its table and writes ``workdir/report``
   (``zkd_jax.trainer.suite``); any other config is one run of K >= 1 students (a ``config.sweep``
   or ``config.students`` is K students in one program, ``zkd_jax.trainer.setup.train_students``),
   preceded, when ``config.teacher.train_if_missing`` is set and the teacher checkpoint does not
   exist, by training the teacher in ``workdir/teacher_<key>`` with ``config.teacher.recipe``
   (``zkd_jax.trainer.teacher_runs``; then the students distill from it).

A suite's teacher and each of its entries are runs of their own (:func:`_train_run`): each checked
and holding its own directory's lock inside the suite's, as a run started there by hand would.
"""

from __future__ import annotations

import jax
import ml_collections
from etils import epath

from zkd_jax.io import lock, paths
from zkd_jax.io import metrics as metrics_io
from zkd_jax.parallel import distributed
from zkd_jax.trainer import setup, suite, teacher_runs, validate


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts jax.distributed when ``config.distributed`` or the environment asks for it."""
    d = config.get("distributed") or {}
    distributed.initialize(
        enabled=d.get("enabled", "auto"), coordinator_address=d.get("coordinator_address"),
        num_processes=d.get("num_processes"), process_id=d.get("process_id"),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                       allow_config_change: bool = False) -> dict:
    """Runs ``config`` in ``workdir`` (module docstring); returns what it trained.

    One run: the summary of its student (``summary.json``), or ``{"students": [summary, ...]}``
    for K students. A suite: ``{"teacher": summary, NAME: summary, ...}``. Rerunning in the same
    workdir resumes (finished runs just report). ``allow_config_change``: a resumed run may
    continue with a config that differs from its checkpoints' (``zkd_jax.trainer.identity``; the
    change is recorded).

    Raises:
      ValueError: a config a user can fix (one line naming the field), before anything is written.
      zkd_jax.io.lock.WorkdirLockedError: another run holds the workdir.
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    validate.check_config(config, devices=0)  # every field; device counts once the backend starts
    initialize_distributed(config)
    validate.check_config(config)  # the batch sizes against the device count
    workdir = paths.absolute(workdir)
    with lock.locked(workdir, enabled=jax.process_index() == 0):
        if suite.is_suite(config):
            return _train_suite(config, workdir, allow_config_change=allow_config_change)
        if teacher_runs.to_train(config):
            config = teacher_runs.with_teacher(config, _train_teacher(config, workdir))
        return setup.train_students(config, workdir, allow_config_change=allow_config_change)


def _train_run(config: ml_collections.ConfigDict, workdir: epath.Path, *,
               allow_config_change: bool = False) -> dict:
    """One run inside a suite or before its students (a teacher, a suite's entry), in a directory
    of its own: checked and locked as the door checks and locks."""
    validate.check_config(config, devices=0)
    initialize_distributed(config)
    validate.check_config(config)
    with lock.locked(workdir, enabled=jax.process_index() == 0):
        return setup.train_students(config, workdir, allow_config_change=allow_config_change)


def _train_teacher(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """The directory of ``config``'s teacher in ``workdir``, trained there unless already there
    (``zkd_jax.trainer.teacher_runs``)."""
    directory, recipe = teacher_runs.reuse_or_announce(config, workdir)
    if recipe is not None:
        _train_run(recipe, directory)
    return directory


def _train_suite(config: ml_collections.ConfigDict, workdir: epath.Path, *,
                 allow_config_change: bool) -> dict[str, dict]:
    """The teacher (once) and one student (or K-student program) per ``config.suite`` entry, then
    the suite's table and report (``zkd_jax.trainer.suite``)."""
    teacher_dir = suite.given_teacher(config) or _train_teacher(config, workdir)
    results = {teacher_runs.TEACHER_SUBDIR: metrics_io.read_summary(teacher_dir) or {}}
    for name, entry in config.suite.items():
        suite.refuse_other_teacher(workdir / name, teacher_dir)
        results[name] = _train_run(suite.entry_config(config, name, entry, teacher_dir),
                                   workdir / name, allow_config_change=allow_config_change)
    suite.report(config, workdir, teacher_dir, results)
    return results

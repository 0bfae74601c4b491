"""Several runs that share one teacher (the demo's shape): what a suite's runs are, and its end.

``config.suite`` maps a run name to a method config. The teacher is trained once, or found already
trained and verified, in ``workdir/teacher_<key>`` (``zkd_jax.trainer.teacher_runs``; or read from
``config.teacher.checkpoint`` when that is set); then each entry runs in ``workdir/NAME`` with
``config.method`` replaced by it, distilling from that one teacher. With ``config.sweep`` (the
demo's default: ``seed=0,1,2``) each entry is one K-student program (``workdir/NAME/student_<k>``).
At the end a table gives, per entry (and per swept setting), the mean ± std over seeds of the final
and the best test top-1 and the per-seed values, and ``workdir/report`` gets ``zkd-report``'s
tables and figures (KD and KD+LS on one axes). Rerunning in the same workdir resumes every run
(finished ones just report). The runs themselves go through the door,
``zkd_jax.trainer.runs.train_and_evaluate``; this module says what they are and writes the end.
"""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import paths
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import suite_table
from zkd_jax.trainer.loop import log_main

#: Config fields that each suite entry replaces: an override of them would be ignored.
REPLACED = ("method", "variant")


def is_suite(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a suite (a non-empty ``config.suite``) rather than one run."""
    return bool(len(config.get("suite", {})))


def refuse_replaced_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Refuses ``--config.method.X`` (and ``--config.variant``; ``--config.optimizer.lr`` where the
    entries set ``lr``) on a suite config: each entry of ``config.suite`` replaces those fields, so
    the override would change nothing.

    Raises:
      ValueError: one line naming the field(s) to use instead, e.g. ``--config.suite.kd.temperature``.
    """
    if not len(config.get("suite", {})):
        return
    replaced = REPLACED + (("optimizer.lr",) if any("lr" in e for e in config.suite.values())
                           else ())
    for name in overrides:
        head = next((r for r in replaced if name == r or str(name).startswith(r + ".")), None)
        if head is None:
            continue
        rest = str(name)[len(head) + 1:] if head == "method" else ("lr" if "lr" in head else "")
        fields = [f"--config.suite.{entry}" + (f".{rest}" if rest else "")
                  for entry in config.suite]
        hint = (f"use {' or '.join(fields)}" if head != "variant" else
                "the suite's entry names are the variants; use configs/demo.py:NAME to pick some")
        raise ValueError(f"--config.{name} is ignored by this config: each entry of config.suite "
                         f"({', '.join(config.suite)}) replaces config.{head}; {hint}.")


def entry_config(config: ml_collections.ConfigDict, name: str, entry,
                 teacher_dir: epath.Path) -> ml_collections.ConfigDict:
    """The run of one suite entry: ``config`` with ``method`` replaced by the entry (less its
    optional ``lr``, which replaces ``optimizer.lr``), distilling from ``teacher_dir``."""
    method = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    lr = method.pop("lr", None)
    run = copy.deepcopy(config)
    with run.unlocked():
        run.variant = name
        run.method = ml_collections.ConfigDict(method)
        if lr is not None:
            run.optimizer.lr = float(lr)
        run.suite = ml_collections.ConfigDict()
        run.teacher.checkpoint = str(teacher_dir)
    return run


def refuse_other_teacher(run_dir: epath.Path, teacher_dir: epath.Path) -> None:
    """Refuses to resume (or report) students of ``run_dir`` distilled from another teacher."""
    for d in (run_dir, run_dir / "student_0"):
        summary = metrics_io.read_summary(d) if (d / metrics_io.SUMMARY).exists() else None
        used = ((summary or {}).get("config") or {}).get("teacher", {}).get("checkpoint")
        if used and paths.absolute(used) != teacher_dir:
            raise ValueError(f"{run_dir} holds students distilled from {used}, not from "
                             f"{teacher_dir} (the teacher config changed); use another --workdir "
                             f"or delete {run_dir}.")


def given_teacher(config: ml_collections.ConfigDict) -> epath.Path | None:
    """The teacher the suite was given (``config.teacher.checkpoint``: a run's workdir or an
    export, used as it is); None: the suite trains (or reuses) its own.

    Raises:
      ValueError: the given checkpoint does not exist.
    """
    if not config.teacher.get("checkpoint"):
        return None
    teacher_dir = paths.absolute(config.teacher.checkpoint)
    if not ckpt_lib.teacher_directory(teacher_dir).exists():
        raise ValueError(f"config.teacher.checkpoint {str(teacher_dir)!r} does not exist; "
                         "point it at a teacher run's workdir or unset it to train one.")
    return teacher_dir


def report(config: ml_collections.ConfigDict, workdir: epath.Path, teacher_dir: epath.Path,
           results: dict[str, dict]) -> None:
    """The suite's end: prints the table of ``suite_table.format_table`` and writes
    ``workdir/report`` (``zkd-report``'s tables and figures; its table printed too for a grid)."""
    log_main(suite_table.format_table(config, results))
    from zkd_jax.report import make_report  # pylint: disable=import-outside-toplevel

    dirs = [str(workdir / name) for name in config.suite]
    if (teacher_dir / metrics_io.SUMMARY).exists():
        dirs.insert(0, str(teacher_dir))
    made = make_report(dirs, str(workdir / "report"))
    if suite_table.sweeps_settings(config):  # a grid: zkd-report's table of every point
        log_main(made["text"])
    figures = [p.rsplit("/", 1)[-1] for p in made["files"] if p.endswith(".png")]
    log_main(f"report: {workdir / 'report'} ({', '.join(figures)})")

"""Several runs that share one teacher: ``train_suite(config, workdir)`` (the demo's shape).

``config.suite`` maps a run name to a method config; the teacher is trained (or found) in
``workdir/teacher`` with ``config.teacher.recipe``, then each student runs in ``workdir/NAME`` with
``config.method`` replaced by its entry, and a table of the accuracies is printed. Rerunning in the
same workdir resumes every run (finished ones just report).
"""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from zkd_jax import checkpoint as ckpt_lib
from zkd_jax import metrics_io, paths, workdir_lock
from zkd_jax.train import (
    TEACHER_SUBDIR,
    initialize_distributed,
    prepare_run,
    log_main,
    teacher_recipe,
    train_and_evaluate,
)


@workdir_lock.holds_workdir(before=prepare_run)
def train_suite(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, dict]:
    """A teacher (``workdir/teacher``) and one student per ``config.suite`` entry (``workdir/NAME``).

    Each entry of ``config.suite`` is a method config replacing ``config.method``; every student
    distills from the same teacher. Prints a table of the accuracies; returns the summaries.
    """
    workdir = paths.absolute(workdir)
    initialize_distributed(config)
    teacher_dir = workdir / TEACHER_SUBDIR
    if not (teacher_dir / ckpt_lib.EXPORT).exists():
        train_and_evaluate(teacher_recipe(config), teacher_dir)
    results = {TEACHER_SUBDIR: metrics_io.read_summary(teacher_dir) or {}}
    for name, method_config in config.suite.items():
        run = copy.deepcopy(config)
        run.variant = name
        run.method = method_config
        run.suite = ml_collections.ConfigDict()
        run.teacher.checkpoint = str(teacher_dir)
        results[name] = train_and_evaluate(run, workdir / name)
    log_main(format_table(config, results))
    return results


def format_table(config: ml_collections.ConfigDict, results: dict[str, dict]) -> str:
    """A small text table: run, model, best top-1 (epoch), last top-1."""
    rows = [("run", "model", "best top-1 (epoch)", "last top-1")]
    for name, s in results.items():
        model = config.teacher.arch if name == TEACHER_SUBDIR else (
            f"{config.student.arch} <- {config.teacher.arch}")
        best = "-" if s.get("best_top1") is None else f"{s['best_top1']:.2f} ({s['best_epoch']})"
        last_top1 = "-" if s.get("last_top1") is None else f"{s['last_top1']:.2f}"
        rows.append((name, model, best, last_top1))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{config.dataset} test accuracy (%)\n" + "\n".join(lines)

"""Several runs that share one teacher: ``train_suite(config, workdir)`` (the demo's shape).

``config.suite`` maps a run name to a method config; the teacher is trained (or found) in
``workdir/teacher`` with ``config.teacher.recipe`` (or read from ``config.teacher.checkpoint``
when that is set), then each student runs in ``workdir/NAME`` with
``config.method`` replaced by its entry, and a table of the accuracies is printed. Rerunning in the
same workdir resumes every run (finished ones just report). With ``config.sweep`` each entry is
one K-student program (``workdir/NAME/student_<k>``) and the report's table (mean ± std) follows.
"""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from zkd_jax.cli.teacher import teacher_recipe
from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import metrics as metrics_io
from zkd_jax.io import lock, paths
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer.loop import log_main
from zkd_jax.trainer.setup import TEACHER_SUBDIR, prepare_run


@lock.holds_workdir(before=prepare_run)
def train_suite(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                allow_config_change: bool = False) -> dict[str, dict]:
    """A teacher (``workdir/teacher``) and one student per ``config.suite`` entry (``workdir/NAME``).

    Each entry of ``config.suite`` is a method config replacing ``config.method``; every student
    distills from the same teacher. Prints a table of the accuracies; returns the summaries.
    """
    workdir = paths.absolute(workdir)
    # A given teacher checkpoint (a run's workdir) is used as it is; else workdir/teacher.
    teacher_dir = (paths.absolute(config.teacher.checkpoint) if config.teacher.get("checkpoint")
                   else workdir / TEACHER_SUBDIR)
    if config.teacher.get("checkpoint"):
        if not ckpt_lib.teacher_directory(teacher_dir).exists():
            raise ValueError(f"config.teacher.checkpoint {str(teacher_dir)!r} does not exist; "
                             "point it at a teacher run's workdir or unset it to train one.")
    elif ckpt_lib.export_damage(teacher_dir) is not None:  # missing or damaged: (re)built
        train_and_evaluate(teacher_recipe(config), teacher_dir)
    results = {TEACHER_SUBDIR: metrics_io.read_summary(teacher_dir) or {}}
    for name, method_config in config.suite.items():
        run = copy.deepcopy(config)
        run.variant = name
        run.method = method_config
        run.suite = ml_collections.ConfigDict()
        run.teacher.checkpoint = str(teacher_dir)
        results[name] = train_and_evaluate(run, workdir / name,
                                           allow_config_change=allow_config_change)
    log_main(format_table(config, results))
    if config.get("sweep"):  # K students per entry: the report's mean ± std over them
        from zkd_jax.report import make_report  # pylint: disable=import-outside-toplevel

        report = make_report([str(workdir)], str(workdir / "report"), figures=False)
        log_main(report["text"])
    return results


#: The footer of the digits demo's table: what its numbers can and cannot show.
DIGITS_NOTE = (
    "5 epochs on 1,500 digit images (297 test images): this shows that training, distillation and "
    "logit standardization run end to end, not which method is better. With one seed per method a "
    "gap between KD and KD+LS is not a result (this run does not measure the spread over seeds); "
    "the paper's claim is about CIFAR-100 "
    "and ImageNet after 240 / 100 epochs, mean of 4 runs. Over seeds: --config.sweep='seed=0,1,2' "
    "(one K-student program per method), then zkd-report WORKDIR.")


def format_table(config: ml_collections.ConfigDict, results: dict[str, dict]) -> str:
    """A small text table: run, model, best top-1 (epoch), last top-1."""
    rows = [("run", "model", "best top-1 (epoch)", "last top-1")]
    for name, s in results.items():
        model = config.teacher.arch if name == TEACHER_SUBDIR else (
            f"{config.student.arch} <- {config.teacher.arch}")
        if s.get("students"):  # a K-student program (config.sweep): mean over its students
            best = _mean_text([x.get("best_top1") for x in s["students"]])
            last_top1 = _mean_text([x.get("last_top1") for x in s["students"]])
            rows.append((name, model, best, last_top1))
            continue
        best = "-" if s.get("best_top1") is None else f"{s['best_top1']:.2f} ({s['best_epoch']})"
        last_top1 = "-" if s.get("last_top1") is None else f"{s['last_top1']:.2f}"
        rows.append((name, model, best, last_top1))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = "\n\n" + DIGITS_NOTE if config.dataset == "digits" else ""
    return f"{config.dataset} test accuracy (%)\n" + "\n".join(lines) + note


def _mean_text(values: list) -> str:
    """``mean ± sample std (n=K)`` of the students' numbers (``-`` when none)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    v = [float(x) for x in values if x is not None]
    if not v:
        return "-"
    std = f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""
    return f"{np.mean(v):.2f}{std} (n={len(v)})"

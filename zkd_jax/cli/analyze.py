r"""``zkd-analyze``: the paper's logit figures for a teacher and its students.

    zkd-analyze --teacher=workdir/demo/teacher_<key> --student=workdir/demo/kd/student_0 \
        --student=workdir/demo/kd_ls/student_0 --out=workdir/demo/analysis

On the test split (``--split``) of the runs' dataset (CIFAR-100, ImageNet or the digits) it writes
``analysis.json`` (logit moments raw / Z-scored, top-1 agreement with the teacher, KL(teacher ||
student) at T = 1 on raw and standardized logits, mean class-correlation difference),
``logit_moments.png`` (raw logits), ``hist2d_<student>.png``, ``corr_diff_<student>.png`` (one
colour scale for all students), ``tsne.png``, each captioned with what was run, and
``logits.npz`` (``zkd_jax.report.analysis.write_analysis``). A ``--student`` that is a K-student
workdir stands for all its ``student_<k>``.
"""

from __future__ import annotations


from absl import app, flags

from zkd_jax.cli import usage

PROG = "zkd-analyze"

_TEACHER = flags.DEFINE_string("teacher", None, "The teacher's run directory (holding export/).",
                               required=True)
_STUDENTS = flags.DEFINE_multi_string("student", None, "A student's run directory (repeatable).",
                                      required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"], "The split to analyze.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset (default: the runs' config.dataset).")
_TSNE = flags.DEFINE_integer("tsne_samples", 2000, "Images in the t-SNE (0: all).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N images of the split (0: all).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])} (see {PROG} --help)")
    usage.quiet_logs()  # orbax logs every file it reads at INFO
    usage.require(PROG, ("matplotlib", "sklearn", "orbax", "etils"))
    from zkd_jax.report.analysis import write_analysis  # after flag parsing

    try:
        with usage.extras_reported(PROG):
            stats = write_analysis(_TEACHER.value, _STUDENTS.value, _OUT.value,
                                   split=_SPLIT.value, dataset=_DATASET.value,
                                   tsne_samples=_TSNE.value, limit=_LIMIT.value)
    except (ValueError, OSError) as err:
        usage.fail(PROG, " ".join(str(err).split()))
    for name, s in stats["students"].items():
        print(f"{name}: agreement {s['agreement']:.2f}%  KL raw {s['kl_raw']:.4f}  KL Z-scored "
              f"{s['kl_standardized']:.4f}  corr diff {s['correlation_difference_mean']:.4f}")
    print(f"wrote {len(stats['files'])} files to {_OUT.value}")


def run() -> None:
    """The ``zkd-analyze`` entry point."""
    usage.print_help_if_asked(PROG, __doc__, __name__, usage=(
        f"{PROG} --teacher=DIR --student=DIR [--student=DIR ...] --out=DIR [--split=test]"))
    app.run(main, flags_parser=usage.absl_parser(PROG))


if __name__ == "__main__":
    run()

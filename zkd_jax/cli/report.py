"""``zkd-report``: tables and curves of the runs under some directories (reads files only).

    zkd-report workdir/demo                                 # -> workdir/demo/report/
    zkd-report runs/ --out=report --layout=paper --reference-logs=ref/logs

Finds every run below the RUN_DIRs (single runs, K-student programs, the demo suite), groups them
by (dataset, method, teacher, student, settings except the seed) and writes ``table.md``,
``table.csv``, ``table.json``, ``curves_*.png`` and, for a sweep, ``sweep_*.png`` into ``--out``
(``zkd_jax.report.make_report``); prints the table. Needs neither TensorFlow nor the network.

A damaged line of a run's ``metrics.jsonl`` (cut, binary) is skipped and named, with the file's
path, among the problems printed under the table; the run's good lines are used. An error the user
can fix (no run found, ``--out`` that is a file, a directory that cannot be written) ends in one
line ``zkd-report: error: ...`` and exit status 2 (``ZKD_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import os

from absl import app, flags

from zkd_jax.cli import errors, usage

PROG = "zkd-report"

_OUT = flags.DEFINE_string("out", None, "Output directory (default: FIRST_RUN_DIR/report).")
_REFERENCE = flags.DEFINE_string(
    "reference-logs", None,
    "Directory of the reference's training logs (mdistiller worklogs or CTKD JSON lines); their "
    "curves are drawn beside the runs of the same method and pair.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "runs", ["runs", "paper"],
    "runs: one row per group; paper: rows methods (with and without LS), columns pairs.")
_FIGURES = flags.DEFINE_boolean("figures", True, "Write the PNG figures.")


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        usage.fail(PROG, f"give at least one RUN_DIR: {PROG} RUN_DIR... [--out DIR] "
                   f"(see {PROG} --help)")
    usage.quiet_logs()
    if _FIGURES.value:
        usage.require(PROG, ("matplotlib",))
    from zkd_jax.report import make_report  # after flag parsing: keeps --help fast

    out = _OUT.value or os.path.join(paths[0], "report")
    if os.path.exists(out) and not os.path.isdir(out):
        errors.fail(PROG, f"--out={out} is a file, not a directory; give a directory (it is "
                          "created if missing).")
    with usage.extras_reported(PROG), errors.reported(PROG):
        result = make_report(paths, out, reference_logs=_REFERENCE.value, layout=_LAYOUT.value,
                             figures=_FIGURES.value)
    print(result["text"])
    print(f"\nwrote {len(result['files'])} files to {out}")


def run() -> None:
    """The ``zkd-report`` entry point."""
    usage.print_help_if_asked(PROG, __doc__, __name__, usage=(
        f"{PROG} RUN_DIR... [--out=DIR] [--layout=runs|paper] [--reference-logs=DIR]"))
    app.run(main, flags_parser=usage.absl_parser(PROG))


if __name__ == "__main__":
    run()

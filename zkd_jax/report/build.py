"""``make_report(paths, out, ...)``: what ``zkd-report`` writes, as a function.

Finds the runs under ``paths`` (``runs.find_runs``), groups them (``table.group_runs``) and writes
into ``out``: ``table.md`` / ``table.csv`` / ``table.json``, one ``curves_<i>.png`` per group,
one ``sweep_<i>.png`` heat map per sweep (groups of one method and pair that differ in one or
two settings) and one ``compare_<i>.png`` per dataset and pair with several methods (KD and KD+LS
on one axes with the teacher's accuracy, ``zkd_jax.report.compare``). Reads files only.
"""

from __future__ import annotations

import os
import re
from typing import Any

from zkd_jax.report import compare, curves, table
from zkd_jax.report.discover import find_runs
from zkd_jax.report.worklog import read_worklogs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:120]


def make_report(paths: list[str], out: str, *, reference_logs: str | None = None,
                layout: str = "runs", note: str = "", figures: bool = True) -> dict[str, Any]:
    """Writes the report of the runs under ``paths`` into ``out``.

    Returns ``{"rows", "problems", "files", "overlays", "text"}``: the table rows, what was
    missing (by run name), the written paths, the reference logs drawn in each curves PNG and the
    Markdown table with its footer.

    Raises:
      ValueError: no run with a config under ``paths``, a bad ``layout`` or ``reference_logs``.
    """
    if layout not in ("runs", "paper"):
        raise ValueError(f"unknown layout {layout!r}; use 'runs' or 'paper'.")
    runs, problems = find_runs(list(paths))
    groups = table.group_runs(runs)
    if not groups:
        raise ValueError("no run with a summary.json under " + ", ".join(map(str, paths))
                         + "; pass the workdir of a zkd-train run."
                         + ("" if not problems else " Problems: " + "; ".join(problems)))
    logs = []
    if reference_logs:
        logs, log_problems = read_worklogs(reference_logs)
        problems = problems + log_problems
    rows = [table.row(g) for g in groups]
    files = list(table.write_tables(rows, out, layout=layout, problems=problems,
                                    note=note).values())
    overlays: dict[str, list[str]] = {}
    if figures:
        for i, g in enumerate(groups):
            name = _slug(f"curves_{i}_{g.method}_{g.pair}") + ".png"
            refs = curves.matching_logs(g, logs)
            files.append(curves.plot_group(g, os.path.join(out, name), refs))
            overlays[name] = [log.label for log in refs]
        for i, family in enumerate(curves.sweep_families(groups)):
            name = _slug(f"sweep_{i}_{family[0].method}_{family[0].pair}")
            files.append(curves.plot_sweep(family, os.path.join(out, name + ".png")))
        for i, (students, teachers) in enumerate(compare.compare_families(groups)):
            name = _slug(f"compare_{i}_{students[0].dataset}_{students[0].pair}") + ".png"
            files.append(compare.plot_compare(students, teachers, os.path.join(out, name)))
    return {"rows": rows, "problems": problems, "files": files, "overlays": overlays,
            "text": table.format_text(rows, problems, note)}

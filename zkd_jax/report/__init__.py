"""Reports of finished (and unfinished) runs: tables, curves, the reference's logs, logit analysis.

``make_report`` is ``zkd-report`` as a function; ``read_worklog`` reads the reference repository's
training logs; ``zkd_jax.report.logit_stats`` holds ``zkd-analyze``'s statistics (NumPy). Everything
but ``analyze``'s model loading reads files only: no TensorFlow, no network.
"""

from zkd_jax.report.build import make_report
from zkd_jax.report.discover import Run, find_runs
from zkd_jax.report.table import Group, group_runs, row
from zkd_jax.report.worklog import Worklog, read_worklog, read_worklogs

__all__ = ["Group", "Run", "Worklog", "find_runs", "group_runs", "make_report", "read_worklog",
           "read_worklogs", "row"]

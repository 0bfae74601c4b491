"""How the command lines end on an error a user can fix: one line, exit code 2, no traceback.

``with reported("zkd-train"): ...`` turns the errors listed in :func:`user_errors` (a bad value,
a locked workdir, a failed checkpoint write, a NaN/inf stop, a file or directory that is missing,
read-only, full or of the wrong kind) into ``zkd-train: error: <message>`` on stderr and
``sys.exit(2)``; a run that failed (:func:`failed_run`: a failed checkpoint write, a full disk, a
NaN/inf stop) exits with 1 instead, and a preempted run (``zkd_jax.trainer.preemption.Preempted``:
its checkpoint is saved) prints ``zkd-train: preempted: ...`` and exits with
:data:`PREEMPTED_EXIT_CODE` (75). Anything else is a bug and keeps its traceback. Set ``ZKD_TRACEBACK=1`` (or pass
``--verbose``) to see the traceback of a user error too, e.g. for a bug report.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Iterator

# One ``fail`` (``prog: error: message``, then the exit code) and one table of exit codes for every
# command: cli.usage's.
from zkd_jax.cli.usage import EXIT_FAILED as FAILED_RUN_EXIT_CODE
from zkd_jax.cli.usage import EXIT_PREEMPTED as PREEMPTED_EXIT_CODE
from zkd_jax.cli.usage import EXIT_USAGE as EXIT_CODE
from zkd_jax.cli.usage import fail

TRACEBACK_ENV = "ZKD_TRACEBACK"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user can fix this"."""
    from zkd_jax.io.lock import WorkdirLockedError  # noqa: PLC0415
    from zkd_jax.io.manifest import CheckpointSaveError  # noqa: PLC0415
    from zkd_jax.trainer.loop import NonFiniteLossError  # noqa: PLC0415

    return (ValueError, OSError, NonFiniteLossError, CheckpointSaveError, WorkdirLockedError)


def failed_run(err: BaseException) -> bool:
    """Whether ``err`` means a run failed (exit code 1) rather than a usage error (2)."""
    from zkd_jax.io.manifest import CheckpointSaveError  # noqa: PLC0415
    from zkd_jax.trainer.loop import NonFiniteLossError  # noqa: PLC0415

    return isinstance(err, (CheckpointSaveError, NonFiniteLossError)) or (
        isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))


def show_traceback(verbose: bool = False) -> bool:
    """True when ``--verbose`` was given or ``ZKD_TRACEBACK`` is set to a non-empty, non-0 value."""
    return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an ``OSError`` says what failed on which path)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        text = f"{err.strerror}{where}; free disk space, then rerun the same command (a " \
               "training run resumes from its last checkpoint)"
    elif isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror}{where}; check the paths given (--workdir, config files, " \
               "checkpoints) and that the disk is writable and not full"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 1000 else text[:997] + "..."




@contextlib.contextmanager
def reported(prog: str, *, verbose: bool = False) -> Iterator[None]:
    """Ends the block's user errors in one ``prog: error: ...`` line and exit code 2."""
    from zkd_jax.trainer.preemption import Preempted  # noqa: PLC0415

    try:
        yield
    except Preempted as done:
        print(f"{prog}: {done}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except user_errors() as err:
        if show_traceback(verbose):
            traceback.print_exc()
        fail(prog, one_line(err), FAILED_RUN_EXIT_CODE if failed_run(err) else EXIT_CODE)

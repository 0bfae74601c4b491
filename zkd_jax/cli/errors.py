"""How the command lines end on an error a user can fix: one line, exit code 2, no traceback.

``with reported("zkd-train"): ...`` turns the errors listed in :func:`user_errors` (a bad value,
a locked workdir, a failed checkpoint write, a NaN/inf stop, a file or directory that is missing,
read-only, full or of the wrong kind) into ``zkd-train: error: <message>`` on stderr and
``sys.exit(2)``. Anything else is a bug and keeps its traceback. Set ``ZKD_TRACEBACK=1`` (or pass
``--verbose``) to see the traceback of a user error too, e.g. for a bug report.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

TRACEBACK_ENV = "ZKD_TRACEBACK"
EXIT_CODE = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user can fix this"."""
    from zkd_jax.io.lock import WorkdirLockedError  # noqa: PLC0415
    from zkd_jax.io.manifest import CheckpointSaveError  # noqa: PLC0415
    from zkd_jax.trainer.loop import NonFiniteLossError  # noqa: PLC0415

    return (ValueError, OSError, NonFiniteLossError, CheckpointSaveError, WorkdirLockedError)


def show_traceback(verbose: bool = False) -> bool:
    """True when ``--verbose`` was given or ``ZKD_TRACEBACK`` is set to a non-empty, non-0 value."""
    return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an ``OSError`` says what failed on which path)."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror}{where}; check the paths given (--workdir, config files, " \
               "checkpoints) and that the disk is writable and not full"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 1000 else text[:997] + "..."


def fail(prog: str, message: str) -> None:
    """Prints ``prog: error: message`` and exits with code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)


@contextlib.contextmanager
def reported(prog: str, *, verbose: bool = False) -> Iterator[None]:
    """Ends the block's user errors in one ``prog: error: ...`` line and exit code 2."""
    try:
        yield
    except user_errors() as err:
        if show_traceback(verbose):
            traceback.print_exc()
        fail(prog, one_line(err))

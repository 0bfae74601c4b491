"""Faults, made and met: the fault-injection hook of the tests, and quiet background errors.

``hit(moment, step)`` is the one place where the trainer can be stopped on purpose: with the
environment variable ``ZKD_FAULT=<moment>:<step>[:<signal>]`` (e.g.
``ZKD_FAULT=after_checkpoint_save:3`` or ``ZKD_FAULT=after_step:7:TERM``), reaching ``moment`` at
``step`` sends the process the signal (default ``KILL``: an abrupt crash). Moments:
``after_step`` (a call of the train step has returned), ``after_checkpoint_save`` (a checkpoint's
save has been started; its files are written in the background) and ``after_checkpoint_commit``
(every checkpoint so far is on disk, before ``metrics.jsonl`` and ``summary.json``). Unset, it
costs a dictionary lookup. In a multi-process run, a signal other than ``KILL`` is followed by a
pause of :data:`NOTICE_WAIT_S` (JAX's SIGTERM listener polls once a second).

:func:`quiet_background_errors` holds, for a run, the tracebacks that orbax's and tensorstore's
background threads print when a write fails (a full disk makes hundreds of lines): they are
counted and kept, not printed, and the first one is summarised in :func:`summary` (the run itself
stops with one line naming the failed checkpoint). ``ZKD_TRACEBACK=1`` (``--verbose``) prints them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

FAULT_ENV = "ZKD_FAULT"
#: A multi-process run's injected SIGTERM waits this long after signalling, so that the notice
#: reaches JAX's preemption service (its listener polls once a second) while the run is young.
NOTICE_WAIT_S = 2.0
MOMENTS = ("after_step", "after_checkpoint_save", "after_checkpoint_commit")


def _planned() -> tuple[str, int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MOMENTS or not parts[1].isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r} is not <moment>:<step>[:<signal>] with a moment "
                         f"of {', '.join(MOMENTS)}; unset it.")
    sig = getattr(signal, "SIG" + (parts[2] if len(parts) == 3 else "KILL").upper(), None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"{FAULT_ENV}={spec!r} names no signal (KILL, TERM, ...); unset it.")
    return parts[0], int(parts[1]), int(sig)


def hit(moment: str, step: int) -> None:
    """Sends the planned signal when ``ZKD_FAULT`` names ``moment`` at ``step`` (see above)."""
    if FAULT_ENV not in os.environ:
        return
    planned = _planned()
    if planned is not None and planned[:2] == (moment, step):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), planned[2])
        if planned[2] != signal.SIGKILL and _processes() > 1:
            time.sleep(NOTICE_WAIT_S)  # JAX's listener polls for SIGTERM once a second


def _processes() -> int:
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None else 1


def remove_partial_checkpoints(dirs) -> None:
    """Deletes the temporary directories of checkpoints whose save failed (orbax names them
    ``<step>.orbax-checkpoint-tmp...``) below each run directory's checkpoint folders."""
    for run_dir in dirs:
        for folder in ("checkpoints", "checkpoints_best"):
            path = run_dir / folder
            if not path.exists():
                continue
            for child in path.iterdir():
                if ".orbax-checkpoint-tmp" in child.name:
                    with contextlib.suppress(OSError):
                        child.rmtree() if child.is_dir() else child.unlink()


# --------------------------------------------------------------------------------------------------
# Background errors
# --------------------------------------------------------------------------------------------------

_held: list[str] = []  # first lines of the tracebacks held back during the run


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` or an exception it was raised from says the disk (or quota) is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def summary() -> str | None:
    """One line on the tracebacks held back (None: there were none)."""
    if not _held:
        return None
    first = " ".join(_held[0].split())
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{len(_held)} background error(s) held back (first: {first})"


class _HoldErrors(logging.Filter):
    """Holds back ERROR records of orbax (logged from its background threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""):
            _held.append(record.getMessage().splitlines()[0] if record.getMessage() else
                         record.pathname)
            return False
        return True


def _first_line(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0] if exc is not None else "unknown"


@contextlib.contextmanager
def quiet_background_errors(enabled: bool = True) -> Iterator[None]:
    """Holds back background-thread tracebacks for the block (see the module's docstring)."""
    if not enabled or os.environ.get("ZKD_TRACEBACK", "") not in ("", "0"):
        yield
        return
    _held.clear()
    hold = _HoldErrors()
    absl_logger = logging.getLogger("absl")
    before = (threading.excepthook, sys.excepthook, sys.unraisablehook)
    main = threading.main_thread()

    def thread_hook(args) -> None:
        _held.append(_first_line(args.exc_value))

    def except_hook(exc_type, exc, tb) -> None:
        if threading.current_thread() is main:
            before[1](exc_type, exc, tb)  # the main thread's own errors go on as usual
            return
        _held.append(_first_line(exc))  # e.g. "Event loop is closed" from a writer's callback

    def unraisable_hook(unraisable) -> None:
        _held.append(_first_line(unraisable.exc_value))

    absl_logger.addFilter(hold)
    threading.excepthook, sys.excepthook, sys.unraisablehook = (
        thread_hook, except_hook, unraisable_hook)
    try:
        yield
    finally:
        absl_logger.removeFilter(hold)
        threading.excepthook, sys.excepthook, sys.unraisablehook = before


__all__ = ["FAULT_ENV", "MOMENTS", "hit", "is_disk_full", "quiet_background_errors", "summary"]

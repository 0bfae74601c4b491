"""Directories written whole or not at all, and write failures told in one line.

``with staged(path, overwrite=...) as tmp:`` gives a temporary sibling directory ``.NAME.zkd-tmp``
to write into (orbax, then the manifest); when the block succeeds, the directory is renamed onto
``path`` (an existing ``path`` is first moved aside and removed after), so ``path`` is either the
old directory or the complete new one with its manifest, never a half-written one (a crash between
the two renames of an overwrite leaves no ``path``; a run's rerun writes its export again). When
the block fails, every temporary (``.NAME.zkd-tmp`` and orbax's ``*.orbax-checkpoint-tmp*`` beside
it) is removed and the failure is raised as one exception naming ``path``: ``OSError(ENOSPC, "No
space left on device", path)`` when the disk is full (orbax and TensorStore report it in many
forms), else ``OSError`` / ``ValueError`` with the first line of the cause. Meanwhile orbax's
background threads' tracebacks (logged through absl) are held back: the one raised error says it
all.

URLs (``gs://...``) have no rename: they are written in place (orbax commits them with a marker).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping

import numpy as np
from etils import epath

_NO_SPACE = ("No space left on device", "RESOURCE_EXHAUSTED", "os_error_code='28'")


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class _DropErrors(logging.Filter):
    """Drops ERROR records of background threads (reported once by the caller instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _closed_loop_error(exc_type, exc, _tb) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _hide_closed_loop_errors() -> None:
    """When a write fails, TensorStore's callbacks still in flight find orbax's event loop closed
    and print "Event loop is closed" tracebacks (``sys.excepthook`` or ``sys.unraisablehook``,
    also after the error was reported): from the first staged write on, those, and only those,
    are dropped."""
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook
    if getattr(previous, "_zkd_hides_closed_loops", False):
        return

    def hook(exc_type, exc, tb):
        if not _closed_loop_error(exc_type, exc, tb):
            previous(exc_type, exc, tb)

    def unraisable(info):
        if not _closed_loop_error(info.exc_type, info.exc_value, info.exc_traceback):
            previous_unraisable(info)

    hook._zkd_hides_closed_loops = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = hook, unraisable


@contextlib.contextmanager
def quiet_background_errors() -> Iterator[None]:
    """Holds back the ERROR records (tracebacks) orbax's and asyncio's threads log in the block."""
    _hide_closed_loop_errors()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    drop = _DropErrors()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it came from) says the disk is full."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(e) for marker in _NO_SPACE):
            return True
    return False


def write_error(err: BaseException, path: epath.PathLike) -> Exception:
    """One exception naming ``path`` for a failed write of it (see the module docstring)."""
    if is_disk_full(err):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno is not None:
            return OSError(e.errno, e.strerror or str(e), os.fspath(path))
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ValueError(f"writing {path} failed ({first})")


def remove_temporaries(path: epath.Path) -> None:
    """Removes ``path``'s staging directory and orbax's temporaries beside it (local only)."""
    if not _is_local(path):
        return
    parent = os.path.dirname(os.fspath(path))
    name = os.path.basename(os.fspath(path))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.zkd-") or entry.startswith(f"{name}.orbax-checkpoint-tmp"):
            full = os.path.join(parent, entry)
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(full)


@contextlib.contextmanager
def staged(path: epath.Path, *, overwrite: bool, primary: bool = True) -> Iterator[epath.Path]:
    """Yields the directory to write ``path``'s content into; see the module docstring.

    ``primary``: this process renames (process 0 of a multi-process job; every process must run
    the block, as orbax coordinates its writes).

    Raises:
      OSError: the write failed on the disk (``ENOSPC`` when full), naming ``path``.
      ValueError: any other failure of the write, naming ``path``.
    """
    if not _is_local(path):
        yield path
        return
    tmp = path.parent / f".{path.name}.zkd-tmp"
    try:
        with quiet_background_errors():
            if primary:
                remove_temporaries(path)  # a crashed earlier attempt's
            yield tmp
        if primary:
            old = path.parent / f".{path.name}.zkd-old"
            if path.exists():
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "already exists", os.fspath(path))
                os.replace(path, old)
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if primary:
            remove_temporaries(path)
        if isinstance(err, Exception) and not isinstance(err, FileExistsError):
            raise write_error(err, path) from None
        raise


def check_finite(arrays: Mapping[str, np.ndarray], *, what: str) -> None:
    """Raises ``ValueError`` naming the first array of ``arrays`` with NaN or inf values.

    >>> check_finite({"fc.weight": np.array([1.0, np.nan])}, what="x.pth")
    Traceback (most recent call last):
    ...
    ValueError: x.pth holds non-finite values in fc.weight (1 NaN, 0 inf of 2); it is damaged or \
from a run that diverged: use an intact checkpoint.
    """
    for name in sorted(arrays):
        value = np.asarray(arrays[name])
        if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
            continue
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        raise ValueError(f"{what} holds non-finite values in {name} ({nan} NaN, {inf} inf of "
                         f"{value.size}); it is damaged or from a run that diverged: use an intact "
                         "checkpoint.")

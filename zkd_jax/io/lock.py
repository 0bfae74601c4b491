"""One run per workdir: ``with lock.locked(workdir): ...`` (``zkd_jax.io.lock``).

The lock is the file ``WORKDIR/.zkd.lock`` holding JSON ``{"host", "pid", "started"}`` of the run
that holds it. It is created atomically (written to a temporary file, then ``os.link``-ed to its
name, which fails when the name exists), before the run writes anything else into the workdir, and
removed when the ``with`` block ends, also on an exception. A second run on a locked workdir ends at
once with :class:`WorkdirLockedError` naming the holder. A lock left by a process that died
(``kill -9``, a crash) on the same host is taken over with one printed line; a lock of another host
is never taken over (remove the file by hand once that run is surely gone).

Only local directories are locked (``gs://`` has no atomic create here; such runs are not
protected), and only by process 0 of a multi-process job. Nested ``locked`` calls of one process on
one directory are counted, not refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from zkd_jax.io import paths

LOCK_FILE = ".zkd.lock"

_held: dict[str, int] = {}  # lock path -> nesting depth within this process


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock (the message names it and what to do)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('started')})"


def _try_create(path: str, record: dict) -> bool:
    """Creates the lock file with ``record`` atomically; False when it exists already."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire(workdir: epath.PathLike) -> str | None:
    """Takes the lock of ``workdir`` (which must exist); returns the lock path (None: not locked).

    Raises:
      WorkdirLockedError: a live process (or one on another host) holds it.
    """
    if not _is_local(workdir):
        return None
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
    if path in _held:
        _held[path] += 1
        return path
    host = socket.gethostname()
    record = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime())}
    for _ in range(3):
        if _try_create(path, record):
            _held[path] = 1
            return path
        holder = _read_holder(path)
        if holder is None:  # released meanwhile
            continue
        pid = holder.get("pid")
        if holder.get("host") == host and isinstance(pid, int) and not _alive(pid):
            print(f"taking over the stale lock of {workdir} left by {_describe(holder)}, which "
                  "is no longer running", flush=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        who = _describe(holder) if holder else "an unreadable lock file"
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by {who}; wait for that run to end or choose another "
            f"--workdir (if no run is using it, delete {path})."
        )
    raise WorkdirLockedError(f"could not take the lock {path}; another run keeps taking it.")


def release(path: str | None) -> None:
    """Gives a lock taken by :func:`acquire` back (removes the file at the outermost release)."""
    if path is None or path not in _held:
        return
    _held[path] -= 1
    if _held[path] == 0:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _is_local(workdir: epath.PathLike) -> bool:
    return "://" not in os.fspath(workdir)


@contextlib.contextmanager
def locked(workdir: epath.PathLike, *, enabled: bool = True) -> Iterator[None]:
    """Holds ``workdir``'s lock for the block (creating ``workdir`` first); ``enabled=False``
    (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    workdir = epath.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} exists and is not a directory; choose another "
                         "--workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    path = acquire(workdir)
    try:
        yield
    finally:
        release(path)


def holds_workdir(before: Callable[[Any], None] | None = None):
    """Decorator of ``fn(config, workdir, ...)``: runs ``before(config)`` (e.g. starting
    ``jax.distributed``, so that the process index is known), then ``fn`` holding ``workdir``'s lock
    on process 0."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(config, workdir, *args, **kwargs):
            if before is not None:
                before(config)
            import jax  # noqa: PLC0415  (after ``before``: the backend may start only then)

            workdir = paths.absolute(workdir)
            with locked(workdir, enabled=jax.process_index() == 0):
                return fn(config, workdir, *args, **kwargs)

        return wrapper

    return decorate

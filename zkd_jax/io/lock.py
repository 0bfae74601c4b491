"""One run per workdir: ``with lock.locked(workdir): ...`` (``zkd_jax.io.lock``).

The lock is the file ``WORKDIR/.zkd.lock``. A run holds it by an exclusive ``fcntl.flock`` on that
file, which the kernel gives to one open file at a time and drops by itself when the holder exits,
however it exits (``kill -9`` included). The file is never unlinked, so every process contends for
the same inode: taking over a lock left by a dead run is the same atomic ``flock`` call as taking a
free one, and two processes can never both hold it.

While it holds the lock, a run keeps its record in the file, JSON ``{"host", "pid", "started"}``
(written under the lock, cleared when the ``with`` block ends, also on an exception), so that a
second run on a locked workdir ends at once with :class:`WorkdirLockedError` naming the holder.
A record left by a process that died on this host is taken over with one printed line. A record of
another host, or of a live process that does not hold the ``flock`` (a run of an older version), is
never taken over (remove the file by hand once that run is surely gone).

Only local directories are locked (``gs://`` has no ``flock``; such runs are not protected), and
only by process 0 of a multi-process job. Nested ``locked`` calls of one process on one directory
are counted, not refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from etils import epath

LOCK_FILE = ".zkd.lock"

#: How often a contender rereads an empty record (the holder is writing or clearing it) before it
#: gives up; a correctness margin only, the lock itself never depends on it.
_RETRIES = 20
_RETRY_SECONDS = 0.05

_held: dict[str, list[int]] = {}  # lock path -> [open file descriptor, nesting depth]


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


def _parse(text: str) -> dict | None:
    """The record in a lock file's text: None when empty (free), ``{}`` when unreadable."""
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_fd(fd: int) -> dict | None:
    return _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))


def holder(workdir: epath.PathLike) -> dict | None:
    """The record of the run holding ``workdir``'s lock now (None: free, or no lock file)."""
    try:
        with open(os.path.join(os.fspath(workdir), LOCK_FILE), encoding="utf-8",
                  errors="replace") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


def _describe(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')!r} (since {record.get('started')})"


def _locked_error(workdir, path: str, record: dict | None) -> WorkdirLockedError:
    who = _describe(record) if record else "an unreadable lock file"
    return WorkdirLockedError(
        f"workdir {workdir} is in use by {who}; wait for that run to end or choose another "
        f"--workdir (if no run is using it, delete {path})."
    )


def _stale(record: dict, host: str) -> bool:
    """Whether ``record`` names a process of this host that is gone (or this very process: a
    container's run restarted with the same pid)."""
    pid = record.get("pid")
    return (record.get("host") == host and isinstance(pid, int)
            and (pid == os.getpid() or not _alive(pid)))


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _take(fd: int, workdir, path: str, host: str) -> None:
    """Holding the ``flock``: checks the record left in the file, then writes ours.

    Raises:
      WorkdirLockedError: the record names another host or a live process of this one.
    """
    old = _read_fd(fd)
    if old is not None:
        if not _stale(old, host):
            raise _locked_error(workdir, path, old)
        print(f"taking over the stale lock of {workdir} left by {_describe(old)}, which is no "
              "longer running", flush=True)
    record = {"host": host, "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def acquire(workdir: epath.PathLike) -> str | None:
    """Takes the lock of ``workdir`` (which must exist); returns the lock path (None: not locked).

    Raises:
      WorkdirLockedError: a live process (or one on another host) holds it.
    """
    if not _is_local(workdir):
        return None
    path = os.path.join(os.fspath(workdir), LOCK_FILE)
    if path in _held:
        _held[path][1] += 1
        return path
    host = socket.gethostname()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(_RETRIES + 1):
            if _try_flock(fd):
                _take(fd, workdir, path, host)
                _held[path] = [fd, 1]
                return path
            record = _read_fd(fd)
            settling = not record or _stale(record, host)  # the holder is writing its record
            if not settling or attempt == _RETRIES:
                raise _locked_error(workdir, path, record)
            time.sleep(_RETRY_SECONDS)
    except BaseException:
        os.close(fd)  # drops our flock too, if we took it
        raise
    raise AssertionError("unreachable")


def release(path: str | None) -> None:
    """Gives a lock taken by :func:`acquire` back: at the outermost release the record is cleared,
    then the ``flock`` dropped (the file stays)."""
    if path is None or path not in _held:
        return
    _held[path][1] -= 1
    if _held[path][1] == 0:
        fd = _held.pop(path)[0]
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)


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

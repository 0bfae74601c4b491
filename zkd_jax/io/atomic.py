"""Files written whole or not at all: a temporary file, ``fsync``, then a rename over the name.

A reader (or a run resumed after ``kill -9``) sees the old content or the new one, never a cut
file. Local paths: the temporary file ``.NAME.tmp-PID`` lives beside the target (same filesystem,
so ``os.replace`` is atomic), is flushed and ``fsync``-ed before the rename, and the directory is
``fsync``-ed after it (best effort). A failure (disk full, permission) removes the temporary file
and raises ``OSError`` naming the target, e.g.
``[Errno 28] No space left on device: '.../summary.json'``.
URLs (``gs://...``): written with ``etils.epath`` in one request, which object stores commit whole.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_text(os.path.join(d, "a.json"), "{}\\n")
>>> open(os.path.join(d, "a.json")).read(), sorted(os.listdir(d))
('{}\\n', ['a.json'])
"""

from __future__ import annotations

import contextlib
import os

from etils import epath


def _is_local(path: str) -> bool:
    return "://" not in path


def write_bytes(path: epath.PathLike, data: bytes) -> None:
    """Replaces ``path``'s content with ``data`` atomically (see the module docstring)."""
    target = os.fspath(path)
    if not _is_local(target):
        epath.Path(target).write_bytes(data)
        return
    directory, name = os.path.split(os.path.abspath(target))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if err.errno is not None:  # name the file the user knows, not the temporary one
            raise OSError(err.errno, err.strerror or str(err), target) from err
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(directory)


def write_text(path: epath.PathLike, text: str) -> None:
    """:func:`write_bytes` of ``text`` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def _sync_directory(directory: str) -> None:
    """Makes a rename inside ``directory`` durable (not every filesystem allows it: ignored)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

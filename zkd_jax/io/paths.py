"""Paths given by users: local (relative or absolute) or URLs such as ``gs://bucket/dir``."""

from __future__ import annotations

import os

from etils import epath


def absolute(path: epath.PathLike) -> epath.Path:
    """``path`` as an absolute ``epath.Path``.

    Orbax refuses relative checkpoint paths, so every directory a user names (a workdir, a teacher
    checkpoint, zkd-convert's output) goes through here: a local relative path is resolved against
    the current directory; a URL (``gs://...``) is kept as it is.
    """
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def is_url(path: epath.PathLike) -> bool:
    """Whether ``path`` names a remote location (``gs://...``) rather than a local file."""
    return "://" in os.fspath(path)

"""Checksum manifests: a checkpoint is used only if every file it had when written is unchanged.

When a checkpoint directory is complete (``zkd_jax.io.checkpoint`` writes the manifest into orbax's
temporary directory just before orbax renames it, so the manifest is part of the commit),
:func:`write` stores ``MANIFEST`` = ``zkd_manifest.json`` inside it: ``{"format": 1, "files":
{relative path: {"size", "sha256"}}}`` of every other file below it but orbax's
``_CHECKPOINT_METADATA`` (rewritten by orbax after the commit), written atomically
(``zkd_jax.io.atomic``). :func:`verify` recomputes
the sizes and SHA-256 sums and names the first file that is missing, of another size or of other
content; a directory without a manifest is unverified (written by another tool, or before manifests
existed) and is not used: checkpoints are passed over, teacher directories refused unless allowed.

Used for ``checkpoints/<step>/`` and ``checkpoints_best/<step>/`` (a damaged newest checkpoint is
moved to ``checkpoints_damaged/`` and the next older verified one is resumed), and for the
``export/`` / ``zkd-convert`` directories that ``zkd_jax.io.torch_weights.load_variables`` reads (a
damaged teacher is refused). Files are hashed in 1 MiB chunks; paths go through ``etils.epath``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

from etils import epath

from zkd_jax.io import atomic

MANIFEST = "zkd_manifest.json"
FORMAT = 1
#: Files of a directory that its manifest does not list: itself, and orbax's step metadata, which
#: orbax rewrites after the commit (a commit timestamp; the manifest is written just before it).
_NOT_LISTED = (MANIFEST, "_CHECKPOINT_METADATA")
_CHUNK = 1 << 20


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permission, timeout); the run stopped."""


def _files(directory: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _files(child, rel + "/")
        elif rel not in _NOT_LISTED and not rel.startswith((MANIFEST + ".", f".{MANIFEST}.")):
            yield rel, child


def _digest(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def compute(directory: epath.PathLike) -> dict:
    """The manifest of ``directory``'s files as they are now."""
    directory = epath.Path(directory)
    files = {rel: {"size": p.stat().length, "sha256": _digest(p)} for rel, p in _files(directory)}
    return {"format": FORMAT, "files": files}


def write(directory: epath.PathLike) -> epath.Path:
    """Writes ``directory/zkd_manifest.json`` atomically (temporary name, then rename)."""
    directory = epath.Path(directory)
    text = json.dumps(compute(directory), indent=1, sort_keys=True) + "\n"
    atomic.write_text(directory / MANIFEST, text)
    return directory / MANIFEST


def has_manifest(directory: epath.PathLike) -> bool:
    return (epath.Path(directory) / MANIFEST).exists()


def verify(directory: epath.PathLike) -> str | None:
    """None when every file of ``directory``'s manifest is there, of its size and content;
    otherwise what is wrong, e.g. ``"file state/d/abc does not match"``."""
    directory = epath.Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        return "its directory is missing"
    if not path.exists():
        return "it has no manifest (written before the run verified it)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"its manifest {MANIFEST} is unreadable"
    for rel, entry in sorted(files.items()):
        f = directory / rel
        if not f.exists():
            return f"file {rel} is missing"
        if f.stat().length != entry["size"]:
            return f"file {rel} has {f.stat().length} bytes instead of {entry['size']}"
        if _digest(f) != entry["sha256"]:
            return f"file {rel} does not match its checksum"
    return None


@contextlib.contextmanager
def saving(what: str, directory: epath.PathLike) -> Iterator[None]:
    """Turns any failure of a checkpoint write inside the block into one
    :class:`CheckpointSaveError` line saying what failed and where."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as err:  # pylint: disable=broad-except  (tensorstore, OSError, TimeoutError)
        cause = f"{type(err).__name__}: {err}".strip().splitlines()[0]
        if "No space left on device" in cause or "os_error_code='28'" in cause:
            cause = "No space left on device"  # tensorstore says it after 300 characters of paths
        cause = cause[:300]
        raise CheckpointSaveError(
            f"saving {what} in {directory} failed ({cause}); the run stopped. Free disk space or "
            "fix the directory's permissions, then rerun to resume from the last verified "
            "checkpoint."
        ) from err

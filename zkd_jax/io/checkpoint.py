"""Orbax checkpoints of a run, and the teacher's variables.

Layout of a workdir (local or ``gs://``; every path goes through ``etils.epath``):

* ``checkpoints/<step>/``: the last ``keep`` checkpoints (epoch ends, every ``checkpoint_every_steps``
  steps, and where a run stops early); each holds ``state`` (the whole train state,
  ``zkd_jax.step.TrainState``: any flax struct dataclass with a ``step`` and a ``buffers`` field
  is saved and restored alike; this module does not import the step layer) and
  ``meta`` (JSON: epoch, step, best_top1, best_epoch, ...). Orbax writes them atomically (a
  temporary directory renamed when complete), so a crash never leaves a half checkpoint behind.
  Writing is asynchronous: ``save`` returns once the arrays are copied to host memory and the
  files are written in the background while training goes on (the next ``save`` and ``close``
  wait for them), so a checkpoint per epoch costs a device-to-host copy, not the file writes.
* ``checkpoints_best/<step>/``: the checkpoint of the best evaluation so far (one).
* ``export/``: the final student variables in ``zkd_jax.io.torch_weights.save_variables`` format: what
  ``config.teacher.checkpoint`` points at when this run's model is used as a teacher (zkd-convert
  writes the same format from a PyTorch ``.pth``).

A run started in a workdir that holds a checkpoint resumes from the newest one whose manifest
verifies (``zkd_jax.io.manifest``). The manifest is part of the commit: orbax writes a checkpoint
into a temporary directory and renames it when complete; the manifest is written into that
temporary directory just before the rename (orbax's post-finalization callback, on the background
thread), so every checkpoint that exists under its step's name has its manifest, and a crash at any
moment leaves either the complete checkpoint or no checkpoint (the temporary one is removed when a
:class:`Checkpointer` is next opened on the workdir: only under the workdir's lock, as
``zkd-train`` does).
A damaged checkpoint is moved to ``checkpoints_damaged/`` with one printed line saying where and how
big; that folder keeps the newest ``keep_damaged`` (``config.keep_damaged_checkpoints``) and deletes
older ones (0: a damaged checkpoint is deleted at once). A failed write raises
``zkd_jax.io.manifest.CheckpointSaveError`` (one line) at the first ``save``/``wait`` that notices it.

``export/`` is written whole (``zkd_jax.io.staging``) with its manifest; :func:`export_damage` tells
a finished run's rerun whether to write it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn

from zkd_jax import models
from zkd_jax.io import manifest, paths, torch_weights

#: The train state a checkpoint holds (``zkd_jax.step.TrainState``, passed in by the trainer).
State = TypeVar("State")

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints_damaged"
BEST = "checkpoints_best"
EXPORT = "export"


class Checkpointer:
    """The last few checkpoints of a run plus its best one (two orbax managers)."""

    def __init__(self, workdir: epath.PathLike, *, keep: int = 3, keep_damaged: int = 1):
        workdir = paths.absolute(workdir)
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints={keep} must be >= 1.")
        if keep_damaged < 0:
            raise ValueError(f"config.keep_damaged_checkpoints={keep_damaged} must be >= 0.")
        self._committing: dict[str, int] = {}  # manager name -> step of the save in flight

        def manager(directory: epath.Path, max_to_keep: int) -> ocp.CheckpointManager:
            # Each manager's barriers get their own names: orbax names the barrier of its "save
            # in progress" flag the same in every manager, and with several processes the main
            # thread's next save and the other manager's background commit could meet in it.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=self._manifest_callback(directory)),
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=f"zkd_{directory.name}"),
            )
            return ocp.CheckpointManager(directory, options=options)

        if jax.process_index() == 0:
            for name in (CHECKPOINTS, BEST):
                _remove_unfinished(workdir / name)
        self.last = manager(workdir / CHECKPOINTS, keep)
        self.best = manager(workdir / BEST, 1)
        self.workdir = workdir
        self.keep_damaged = keep_damaged
        self._unverified: list[tuple[ocp.CheckpointManager, int]] = []  # saved, no manifest yet
        self._verified: set[tuple[int, int]] = set()  # (id(manager), step)
        self.failed = False  # a save failed: close() then waits for nothing more

    def _manifest_callback(self, directory: epath.Path):
        """Writes the manifest of the save in flight into its temporary directory, which orbax
        renames to ``<step>`` right after (``gs://``: the step directory before its commit
        marker)."""

        def callback() -> None:
            step = self._committing.pop(directory.name, None)
            if step is None or jax.process_index() != 0:
                return
            staged = sorted(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            target = staged[-1] if staged else directory / str(step)
            if target.exists():
                manifest.write(target)

        return callback

    def latest_step(self) -> int | None:
        """Step of the newest verified checkpoint, None when the workdir holds none; damaged ones
        (and a damaged best checkpoint) are moved to ``checkpoints_damaged/``, one line each."""
        self.wait()
        self._newest_verified(self.best, "best checkpoint")
        return self._newest_verified(self.last, "checkpoint")

    def _step_dir(self, mngr: ocp.CheckpointManager, step: int) -> epath.Path:
        return epath.Path(mngr.directory) / str(step)

    def _newest_verified(self, mngr: ocp.CheckpointManager, what: str) -> int | None:
        for step in sorted(mngr.all_steps(), reverse=True):
            if (id(mngr), step) in self._verified:
                return step
            reason = manifest.verify(self._step_dir(mngr, step))
            if reason is None:
                self._verified.add((id(mngr), step))
                return step
            where = self._set_aside(self._step_dir(mngr, step), f"{epath.Path(mngr.directory).name}"
                                    f"-{step}")
            print(f"{what} {step} in {mngr.directory} is damaged ({reason}); passed over ({where})",
                  flush=True)
            mngr.reload()
        return None

    def _set_aside(self, directory: epath.Path, name: str) -> str:
        """Moves a damaged checkpoint to ``checkpoints_damaged/<name>`` (process 0), keeping the
        newest ``keep_damaged`` there; returns what was done, for the message."""
        size = _human(_size(directory))
        damaged = self.workdir / DAMAGED
        if self.keep_damaged == 0:
            if jax.process_index() == 0:
                directory.rmtree()
            return f"deleted, {size}; config.keep_damaged_checkpoints=0"
        moved = damaged / name
        if jax.process_index() == 0:
            damaged.mkdir(parents=True, exist_ok=True)
            if moved.exists():
                moved = damaged / f"{name}-{len(list(damaged.iterdir()))}"
            directory.rename(moved)
            _touch(moved)
            dropped = _prune(damaged, self.keep_damaged)
        else:
            dropped = 0
        kept = (f"; {damaged} keeps the newest {self.keep_damaged} "
                f"(config.keep_damaged_checkpoints), {dropped} older deleted" if dropped else
                f"; delete it once inspected, {damaged} keeps the newest {self.keep_damaged}")
        return f"moved to {moved}, {size}{kept}"

    def save(self, state: State, meta: Mapping[str, Any], *, best: bool = False) -> int:
        """Writes ``state`` and ``meta`` at ``state.step`` (and as the best one when ``best``).

        Returns when the arrays are on the host; the files follow in the background (``wait``).
        """
        step = int(jax.device_get(state.step))
        meta = dict(meta, step=step)
        self.wait()  # the previous save has committed (its manifest written, its errors raised)
        managers = [self.last] + ([self.best] if best else [])
        for i, mngr in enumerate(managers):
            if step in mngr.all_steps():
                continue  # the same state was written already (e.g. before a restart)
            if i and jax.process_count() > 1:  # one background commit at a time across processes
                with self._saving(f"checkpoint {step}", managers[i - 1]):
                    managers[i - 1].wait_until_finished()
            self._committing[epath.Path(mngr.directory).name] = step
            with self._saving(f"checkpoint {step}", mngr):
                mngr.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                    force=True,
                )
            self._unverified.append((mngr, step))
        return step

    @contextlib.contextmanager
    def _saving(self, what: str, mngr: ocp.CheckpointManager):
        """``manifest.saving`` that also marks this checkpointer as failed."""
        try:
            with manifest.saving(what, mngr.directory):
                yield
        except manifest.CheckpointSaveError:
            self.failed = True
            raise

    def wait(self) -> None:
        """Blocks until every checkpoint written so far is complete on disk, then writes their
        manifests (process 0).

        Raises:
          zkd_jax.io.manifest.CheckpointSaveError: a (background) write failed.
        """
        for mngr in (self.last, self.best):
            with self._saving("a checkpoint", mngr):
                mngr.wait_until_finished()
        pending, self._unverified = self._unverified, []
        for mngr, step in pending:
            directory = self._step_dir(mngr, step)
            if (jax.process_index() == 0 and directory.exists()
                    and not manifest.has_manifest(directory)):  # the commit's callback did not run
                with self._saving(f"the manifest of checkpoint {step}", mngr):
                    manifest.write(directory)
            self._verified.add((id(mngr), step))

    def restore(self, template: State, step: int | None = None) -> tuple[State, dict]:
        """The checkpoint at ``step`` (default the latest), with ``template``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError("there is no checkpoint to restore in this workdir.")
        if (id(self.last), step) not in self._verified:
            reason = manifest.verify(self._step_dir(self.last, step))
            if reason is not None:
                raise ValueError(f"checkpoint {step} in {self.last.directory} is damaged "
                                 f"({reason}); delete it to resume from an older one.")
            self._verified.add((id(self.last), step))
        def restore(item):
            return self.last.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(item), meta=ocp.args.JsonRestore()))

        try:
            restored = restore(template)
            state = restored["state"]
        except ValueError:
            if template.buffers:
                raise
            # Written before the train state had `buffers` (empty for every model but T2T-ViT's).
            fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template)
                      if f.name != "buffers"}
            restored = restore(fields)
            state = template.replace(**restored["state"])
        return state, dict(restored["meta"])

    def close(self) -> None:
        """Waits for the pending saves (unless one failed already) and closes the managers."""
        try:
            if not self.failed:
                self.wait()
        finally:
            for mngr in (self.last, self.best):
                try:
                    mngr.close()
                except Exception:  # pylint: disable=broad-except
                    if not self.failed:
                        raise


def _remove_unfinished(directory: epath.Path) -> None:
    """Removes orbax's temporary directories of saves a crash cut short (the workdir's lock
    guarantees that no other run is writing one). Local workdirs only: on ``gs://`` orbax commits
    a step with a marker file, not by renaming a temporary directory."""
    if not paths.is_url(directory) and directory.exists():
        for path in directory.glob("*.orbax-checkpoint-tmp*"):
            path.rmtree()


def _size(directory: epath.Path) -> int:
    """Bytes of the files below ``directory``."""
    return sum(_size(p) if p.is_dir() else p.stat().length for p in directory.iterdir())


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


#: A file written into a damaged checkpoint when it is set aside: its time orders the copies.
SET_ASIDE = "zkd_set_aside"


def _touch(directory: epath.Path) -> None:
    """Marks the time ``directory`` was set aside (a file written now; local and ``gs://``)."""
    with contextlib.suppress(OSError, NotImplementedError):
        (directory / SET_ASIDE).write_text("")


def _arrived(entry: epath.Path) -> float:
    """When ``entry`` was set aside (its mark's time, else its own)."""
    mark = entry / SET_ASIDE
    return (mark if entry.is_dir() and mark.exists() else entry).stat().mtime


def _prune(damaged: epath.Path, keep: int) -> int:
    """Deletes all but the newest ``keep`` entries of ``damaged``; returns how many it deleted."""
    entries = sorted(damaged.iterdir(), key=lambda p: (_arrived(p), p.name))
    old = entries[:max(len(entries) - keep, 0)]
    for entry in old:
        if entry.is_dir():
            entry.rmtree()
        else:
            entry.unlink()
    return len(old)


def export_damage(workdir: epath.PathLike) -> str | None:
    """What is wrong with ``workdir/export`` (``"it is missing"``, a ``manifest.verify`` reason), or
    None when it verifies."""
    directory = paths.absolute(workdir) / EXPORT
    return "it is missing" if not directory.exists() else manifest.verify(directory)


def teacher_directory(path: epath.PathLike) -> epath.Path:
    """The variables directory of a teacher: ``path/export`` for a run's workdir, else ``path``."""
    path = paths.absolute(path)
    return path / EXPORT if (path / EXPORT).exists() else path


def export_variables(
    workdir: epath.PathLike, variables: Mapping[str, Any], *, arch: str, dataset: str,
    num_classes: int, overwrite: bool = False,
) -> epath.Path:
    """Writes ``workdir/export`` with ``zkd_jax.torch_weights.save_variables`` (teacher format);
    ``overwrite``: replaces an older or damaged export (a run trained on past it, or a rerun that rebuilds it)."""
    directory = paths.absolute(workdir) / EXPORT
    torch_weights.save_variables(
        directory, jax.device_get(dict(variables)), arch=arch, dataset=dataset,
        num_classes=num_classes, overwrite=overwrite,
    )
    return directory


def load_teacher(
    path: epath.PathLike, *, module: nn.Module, arch: str, input_shape: tuple[int, ...],
    allow_unverified: bool = False,
) -> dict:
    """Loads a teacher's variables and checks them against ``module``.

    Args:
      path: a directory written by ``zkd-convert`` or a teacher run's workdir (``export/`` inside).
      module: the teacher module the variables must fit.
      arch: the architecture ``config.teacher.arch`` names.
      input_shape: ``(1, H, W, C)``, to build the expected variable shapes (``jax.eval_shape``).
      allow_unverified: load a directory without manifest (variables written by other tools);
        otherwise it is refused (``zkd_jax.io.torch_weights.load_variables``).

    Raises:
      ValueError: the directory is missing, unverified or damaged, or holds another architecture
        or other shapes.
    """
    directory = teacher_directory(path)
    if not directory.exists():
        raise ValueError(
            f"teacher checkpoint {str(path)!r} does not exist; convert the published teacher with "
            "zkd-convert, or set config.teacher.train_if_missing=True to train one."
        )
    variables, metadata = torch_weights.load_variables(directory, allow_unverified=allow_unverified)
    stored_arch = (metadata or {}).get("arch")
    if stored_arch is not None and stored_arch != arch:
        raise ValueError(
            f"teacher checkpoint {str(path)!r} holds a {stored_arch!r}, but config.teacher.arch is "
            f"{arch!r}; point config.teacher.checkpoint at a {arch} checkpoint or change the arch."
        )
    expected = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jax.numpy.zeros(input_shape), train=False)
    )
    models.check_variables(
        dict(expected), dict(variables), what=f"teacher checkpoint {str(path)!r}",
        hint=f"point config.teacher.checkpoint at a {arch} checkpoint of this dataset",
    )
    return dict(variables)

"""Teacher-if-missing: the config that trains a run's teacher, and training it (once) before the run.

A trained teacher lives in ``WORKDIR/teacher_<key>``, where ``key`` is a short hash of the teacher's
config (``teacher_key``: its architecture, data, solver, epochs and its own ``seed``, not where or
how it runs). The demo, a sweep and every student of a suite distill from that one directory: a
student's seed never retrains it, a second run in the same workdir reuses it after checking its
``export/`` against its manifest and its ``summary.json`` against the config, and a changed teacher
config (``--config.teacher.recipe.epochs=8``, ``--config.teacher.recipe.seed=1``) trains a new
teacher in a directory of its own.
"""

from __future__ import annotations

import copy
import hashlib
import json

import ml_collections
from etils import epath

from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import manifest
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer.loop import log_main
from zkd_jax.trainer.setup import TEACHER_SUBDIR

#: Fields of the student's config the teacher's recipe follows (the data it reads, how it runs).
FOLLOWED = ("dataset", "data_dir", "distributed", "progress_bar", "input_pipeline")

#: Recipe fields that do not change the trained teacher (where and how it runs): not in its key.
RUNTIME = frozenset({"data_dir", "distributed", "progress_bar", "log_every_steps",
                     "checkpoint_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
                     "eval_batch_size", "eval_every_epochs", "paper", "teacher", "suite",
                     "students", "students_form", "sweep", "max_steps"})


def teacher_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config that trains ``config``'s teacher; the fields of ``FOLLOWED`` are the student's."""
    if config.teacher.get("recipe") is None:
        raise ValueError("config.teacher.recipe is missing; cannot train the teacher.")
    recipe = copy.deepcopy(config.teacher.recipe)
    with recipe.unlocked():
        for key in FOLLOWED:
            if key in config:
                recipe[key] = copy.deepcopy(config[key])
    return recipe


def teacher_key(recipe: ml_collections.ConfigDict) -> str:
    """8 hex digits of the SHA-256 of the recipe's fields that shape the teacher (not ``RUNTIME``).

    >>> from zkd_jax.configs import demo
    >>> r = demo.teacher_config()
    >>> k = teacher_key(r); r.seed = 1; len(k), k != teacher_key(r)
    (8, True)
    """
    fields = {k: v for k, v in recipe.to_dict().items() if k not in RUNTIME}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def teacher_dir(workdir: epath.Path, recipe: ml_collections.ConfigDict) -> epath.Path:
    """``workdir/teacher_<key>``: where ``recipe``'s teacher is trained."""
    return workdir / f"{TEACHER_SUBDIR}_{teacher_key(recipe)}"


def _reusable(directory: epath.Path, key: str) -> bool:
    """Whether ``directory`` holds a finished teacher of ``key`` with a verified export.

    A damaged export is not reusable: rerunning the finished run rebuilds it.

    Raises:
      ValueError: the directory holds a teacher of another config.
    """
    summary = metrics_io.read_summary(directory) if (directory / "summary.json").exists() else None
    export = directory / ckpt_lib.EXPORT
    if summary is None or not summary.get("finished") or not export.exists():
        return False  # not trained yet, or stopped part way: train_and_evaluate resumes it
    stored = ml_collections.ConfigDict(summary.get("config") or {})
    if teacher_key(stored) != key:
        raise ValueError(f"{directory} holds a teacher of another config (key "
                         f"{teacher_key(stored)}, not {key}); move it away or delete it.")
    damage = manifest.verify(export)
    if damage is not None:  # the rerun of the finished run rebuilds it from its last checkpoint
        log_main(f"teacher: the export {export} is damaged ({damage}); rebuilding it")
        return False
    return True


def train_or_reuse_teacher(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """The directory of ``config``'s teacher in ``workdir``, trained there unless already there.

    Logs which of the two happened. Raises ``ValueError`` (``_reusable``) for a directory that
    holds another teacher.
    """
    recipe = teacher_recipe(config)
    key = teacher_key(recipe)
    directory = workdir / f"{TEACHER_SUBDIR}_{key}"
    if _reusable(directory, key):
        top1 = metrics_io.read_summary(directory).get("last_top1")
        log_main(f"teacher: reusing {directory} (config key {key}, export verified against its "
                 f"manifest; test top-1 {top1:.2f})")
    else:
        epochs = f"{recipe.epochs} epoch" + ("s" if recipe.epochs != 1 else "")
        log_main(f"teacher: training {recipe.student.arch} (seed {recipe.seed}, {epochs}) in "
                 f"{directory} (config key {key})")
        train_and_evaluate(recipe, directory)
    return directory


def ensure_teacher(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """``config`` with ``teacher.checkpoint`` pointing at an existing teacher.

    A given checkpoint that exists is kept. Otherwise, with ``config.teacher.train_if_missing``, the
    teacher is trained (or found finished) in ``workdir/teacher_<key>`` (``train_or_reuse_teacher``)
    and the returned copy points there. Else ``config`` is returned unchanged and the trainer says
    what is missing.
    """
    path = config.teacher.get("checkpoint")
    if path and ckpt_lib.teacher_directory(path).exists():
        return config
    if not config.teacher.get("train_if_missing"):
        return config
    source = train_or_reuse_teacher(config, workdir)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.teacher.checkpoint = str(source)
    return config

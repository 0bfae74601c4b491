"""A run's teacher trained if missing: its config, its directory, and whether one is there already.

A trained teacher lives in ``WORKDIR/teacher_<key>``, where ``key`` is a short hash of the teacher's
config (``teacher_key``: its architecture, data, solver, epochs and its own ``seed``, not where or
how it runs). The demo, a sweep and every student of a suite distill from that one directory: a
student's seed never retrains it, a second run in the same workdir reuses it after checking its
``export/`` against its manifest and its ``summary.json`` against the config, and a changed teacher
config (``--config.teacher.recipe.epochs=8``, ``--config.teacher.recipe.seed=1``) trains a new
teacher in a directory of its own. The training itself is a run of the door
(``zkd_jax.trainer.runs``); this module decides and logs.
"""

from __future__ import annotations

import copy
import hashlib
import json

import ml_collections
from etils import epath

from zkd_jax import methods
from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.io import manifest
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer.loop import log_main

#: The name of a teacher's directory in a workdir (``teacher_<key>``) and its entry in a suite's
#: results.
TEACHER_SUBDIR = "teacher"

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
        return False  # not trained yet, or stopped part way: its run resumes it
    stored = ml_collections.ConfigDict(summary.get("config") or {})
    if teacher_key(stored) != key:
        raise ValueError(f"{directory} holds a teacher of another config (key "
                         f"{teacher_key(stored)}, not {key}); move it away or delete it.")
    damage = manifest.verify(export)
    if damage is not None:  # the rerun of the finished run rebuilds it from its last checkpoint
        log_main(f"teacher: the export {export} is damaged ({damage}); rebuilding it")
        return False
    return True


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's method distills from a teacher (cross-entropy alone does not)."""
    return methods.from_config(config.method.to_dict()).needs_teacher


def to_train(config: ml_collections.ConfigDict) -> bool:
    """Whether the run must train its teacher first: its method needs one, the checkpoint given
    (if any) does not exist and ``config.teacher.train_if_missing`` asks for it. Otherwise the
    run goes on as it is (a teacher that is missing and not to be trained: the trainer says what
    is missing)."""
    if not needs_teacher(config):
        return False
    path = config.teacher.get("checkpoint")
    if path and ckpt_lib.teacher_directory(path).exists():
        return False
    return bool(config.teacher.get("train_if_missing"))


def reuse_or_announce(config: ml_collections.ConfigDict, workdir: epath.Path
                      ) -> tuple[epath.Path, ml_collections.ConfigDict | None]:
    """``(directory, recipe)`` of ``config``'s teacher in ``workdir``: ``recipe`` is the config to
    train there, or None when a finished teacher of that config is already there. Logs which of
    the two it is.

    Raises:
      ValueError: the directory holds a teacher of another config (``_reusable``).
    """
    recipe = teacher_recipe(config)
    key = teacher_key(recipe)
    directory = workdir / f"{TEACHER_SUBDIR}_{key}"
    if _reusable(directory, key):
        top1 = metrics_io.read_summary(directory).get("last_top1")
        log_main(f"teacher: reusing {directory} (config key {key}, export verified against its "
                 f"manifest; test top-1 {top1:.2f})")
        return directory, None
    epochs = f"{recipe.epochs} epoch" + ("s" if recipe.epochs != 1 else "")
    log_main(f"teacher: training {recipe.student.arch} (seed {recipe.seed}, {epochs}) in "
             f"{directory} (config key {key})")
    return directory, recipe


def with_teacher(config: ml_collections.ConfigDict, directory: epath.Path
                 ) -> ml_collections.ConfigDict:
    """A copy of ``config`` distilling from the teacher in ``directory``."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.teacher.checkpoint = str(directory)
    return config

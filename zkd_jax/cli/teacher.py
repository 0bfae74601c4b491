"""Teacher-if-missing: the config that trains a run's teacher, and training it before the run."""

from __future__ import annotations

import copy

import ml_collections
from etils import epath

from zkd_jax.io import checkpoint as ckpt_lib
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer.loop import log_main
from zkd_jax.trainer.setup import TEACHER_SUBDIR


def teacher_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config that trains ``config``'s teacher; data and runtime fields follow the student's."""
    if config.teacher.get("recipe") is None:
        raise ValueError("config.teacher.recipe is missing; cannot train the teacher.")
    recipe = copy.deepcopy(config.teacher.recipe)
    for key in ("data_dir", "distributed", "progress_bar", "input_pipeline"):
        recipe[key] = copy.deepcopy(config[key])
    return recipe


def ensure_teacher(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """``config`` with ``teacher.checkpoint`` pointing at an existing teacher.

    A given checkpoint that exists is kept. Otherwise, with ``config.teacher.train_if_missing``, the
    teacher is trained (or found finished) in ``workdir/teacher`` and the returned copy points
    there. Else ``config`` is returned unchanged and the trainer says what is missing.
    """
    path = config.teacher.get("checkpoint")
    if path and ckpt_lib.teacher_directory(path).exists():
        return config
    if not config.teacher.get("train_if_missing"):
        return config
    source = workdir / TEACHER_SUBDIR
    if ckpt_lib.export_damage(source) is not None:  # missing or damaged: the rerun rebuilds it
        log_main(f"training the teacher ({config.teacher.arch}) in {source}")
        train_and_evaluate(teacher_recipe(config), source)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.teacher.checkpoint = str(source)
    return config

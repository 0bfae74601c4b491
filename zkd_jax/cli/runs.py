"""What ``zkd-train`` runs for a config, one level above the trainer.

``run(config, workdir)``: a config with a non-empty ``suite`` (the demo) trains its teacher and each
listed student (``zkd_jax.cli.suite``); any other config is one run of the trainer, preceded, when
``config.teacher.train_if_missing`` is set and the teacher checkpoint does not exist, by training
the teacher in ``workdir/teacher`` with ``config.teacher.recipe`` (then the student distills from
it). The trainer itself never trains a teacher.
"""

from __future__ import annotations

import ml_collections
from etils import epath

from zkd_jax import methods
from zkd_jax.cli import suite
from zkd_jax.cli.teacher import ensure_teacher
from zkd_jax.io import paths
from zkd_jax.trainer import train_and_evaluate


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's method distills from a teacher (cross-entropy alone does not)."""
    return methods.from_config(config.method).needs_teacher


def command_line_overrides() -> list[str]:
    """The ``--config.FIELD`` names given on the command line (none when flags are not parsed)."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    if "config" not in flags.FLAGS or not flags.FLAGS.is_parsed():
        return []
    try:
        return list(config_flags.get_override_values(flags.FLAGS["config"]))
    except (AttributeError, TypeError):  # not a config_flags flag
        return []


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
        allow_config_change: bool = False) -> dict:
    """The suite of ``config.suite``, or one run (after training a missing teacher if asked).

    ``allow_config_change``: a resumed run may continue with a config that differs from its
    checkpoints' (``zkd_jax.trainer.identity``; the change is recorded).
    """
    if len(config.get("suite", {})):
        suite.refuse_replaced_overrides(config, command_line_overrides())
        return suite.train_suite(config, workdir, allow_config_change=allow_config_change)
    workdir = paths.absolute(workdir)
    if needs_teacher(config):
        config = ensure_teacher(config, workdir)
    return train_and_evaluate(config, workdir, allow_config_change=allow_config_change)

"""The trainer: a run from its config to its summary.

``train_and_evaluate(config, workdir)`` (``zkd_jax.trainer.runs``) is the one door: what
``zkd-train`` runs for a config, a suite, a sweep or one run of K >= 1 students.
"""

from zkd_jax.trainer.loop import NonFiniteLossError
from zkd_jax.trainer.runs import train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

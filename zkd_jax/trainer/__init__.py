"""The trainer: sets a run of K >= 1 students up from its config and runs the epoch loop."""

from zkd_jax.trainer.loop import NonFiniteLossError
from zkd_jax.trainer.setup import train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

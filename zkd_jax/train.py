"""Public entry of the trainer, kept where users import it: ``zkd_jax.train.train_and_evaluate``.

``train_and_evaluate(config, workdir)`` runs what ``zkd-train`` runs for ``config``
(``zkd_jax.cli.runs.run``): the demo suite, or one run of K >= 1 students, training a missing
teacher first when ``config.teacher.train_if_missing`` asks for it. The trainer itself lives in
``zkd_jax.trainer``.
"""

from zkd_jax.cli.runs import run as train_and_evaluate
from zkd_jax.trainer import NonFiniteLossError

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

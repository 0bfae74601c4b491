"""zkd_jax: Logit Standardization in Knowledge Distillation (Sun et al., CVPR 2024) in JAX.

The loss API is re-exported here so that other code bases can write ``from zkd_jax import kd_loss``.
"""

from zkd_jax.losses import (
    cross_entropy,
    bc_loss,
    cc_loss,
    ctkd_lambda,
    ctkd_temperature,
    dkd_loss,
    gradient_reversal,
    kd_loss,
    kd_loss_from_hidden,
    mlkd_loss,
    standardize,
)

__version__ = "0.1.0"

__all__ = [
    "bc_loss",
    "cc_loss",
    "ctkd_lambda",
    "cross_entropy",
    "ctkd_temperature",
    "dkd_loss",
    "gradient_reversal",
    "kd_loss",
    "kd_loss_from_hidden",
    "mlkd_loss",
    "standardize",
]

"""Thin wrapper so that `--config=configs/cifar100_vit.py[:ARG]` works from a checkout.

The config itself lives in the package (`zkd_jax/configs/cifar100_vit.py`), so pip-installed users have it too.
"""

from zkd_jax.configs.cifar100_vit import get_config  # noqa: F401

"""Thin wrapper so that `--config=configs/imagenet.py[:ARG]` works from a checkout.

The config itself lives in the package (`zkd_jax/configs/imagenet.py`), so pip-installed users have it too.
"""

from zkd_jax.configs.imagenet import get_config  # noqa: F401

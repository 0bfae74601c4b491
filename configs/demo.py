"""Thin wrapper so that `--config=configs/demo.py[:ARG]` works from a checkout.

The config itself lives in the package (`zkd_jax/configs/demo.py`), so pip-installed users have it too.
"""

from zkd_jax.configs.demo import get_config  # noqa: F401

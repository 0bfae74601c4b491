"""Adapters to other JAX training libraries; each imports its library lazily (optional extras).

Nothing here is imported by ``zkd_jax/__init__.py``: ``import zkd_jax`` never needs them.
``tunix``: ``StandardizedLogitStrategy``, Tunix's ``LogitStrategy`` with logit standardization
(``tunix_strategy``: its earlier factory, kept).
"""

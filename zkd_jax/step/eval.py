"""The jitted evaluation step: eval-mode forward, top-1/top-5 hits and cross-entropy sums."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from zkd_jax.parallel import batch_sharding, replicated

EvalStep = Callable[[Any, Mapping[str, Any]], dict]


def make_eval_step(model: nn.Module, mesh: Mesh) -> EvalStep:
    """Builds the jitted ``eval_step(variables, batch) -> sums`` (eval-mode forward).

    ``batch``: "image" ``[B, H, W, C]``, "label" ``[B]`` and optionally "mask" ``[B]`` (padded rows
    False). Returns replicated scalars: ``correct1``, ``correct5`` and ``count`` (int32, masked
    rows excluded) and ``ce_sum`` (float32 sum of per-example cross-entropy).
    """

    def eval_step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        labels = batch["label"].astype(jnp.int32)
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
        k = min(5, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        hits = top == labels[:, None]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return {
            "correct1": jnp.sum(hits[:, 0] & mask, dtype=jnp.int32),
            "correct5": jnp.sum(jnp.any(hits, axis=-1) & mask, dtype=jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.int32),
            "ce_sum": jnp.sum(jnp.where(mask, ce, 0.0)),
        }

    rep = replicated(mesh)
    return jax.jit(eval_step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=rep)


__all__ = ["EvalStep", "make_eval_step"]

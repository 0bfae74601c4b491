"""The ViT pieces together on CPU: a small DeiT distilled from a small CIFAR ResNet through
``teacher_input`` (BN batch statistics), ``ViTKD`` and ``optim.adamw`` with its decay mask. Not the
trainer (which does not run the ViT configs yet): a hand-written step, loss finite and falling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zkd_jax import methods, models, optim
from zkd_jax.models.vit_layers import teacher_input


def numpy_variables(model, image_hw, std: float, seed: int = 0) -> dict:
    """``std N(0, 1)`` for weights, 1 for LayerNorm/BN scales and variances, 0 for biases and
    means (no init program to compile: jitted inits of these models compile slowly on CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    abstract = models.abstract_variables(model, image_hw=image_hw)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def test_small_deit_distillation_step_decreases_loss():
    student = models.create("deit_ti", num_classes=10, dataset="cifar100_224").clone(
        img_size=96, patch_size=16, dim=32, depth=2, num_heads=2)
    teacher = models.create("resnet8", num_classes=10, dataset="cifar100")
    x = jax.random.normal(jax.random.key(0), (8, 96, 96, 3))
    labels = jnp.arange(8) % 10
    s_vars = numpy_variables(student, (96, 96), std=0.02)
    t_vars = numpy_variables(teacher, (32, 32), std=0.2)
    method = methods.ViTKD(extra_weight=10.0, kd_head="dist")
    tx = optim.adamw(optim.per_epoch_schedule([1e-3], steps_per_epoch=1), weight_decay=0.05)
    opt_state = tx.init(s_vars["params"])

    @jax.jit
    def step(params, opt_state, rng):
        t_logits, _ = teacher.apply(t_vars, teacher_input(x), train=True, mutable=["batch_stats"])

        def loss_fn(params):
            heads = student.apply({"params": params}, x, train=True, return_heads=True,
                                  rngs={"dropout": rng})
            logits = {"weak": heads["cls"], methods.DIST_VIEW: heads["dist"]}
            return method.objective({}, logits, {"weak": jax.lax.stop_gradient(t_logits)},
                                    labels, jnp.int32(1))

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, losses = s_vars["params"], []
    for i in range(8):
        params, opt_state, loss = step(params, opt_state, jax.random.key(10 + i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses

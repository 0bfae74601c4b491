"""The sharded distillation step of one student.

On the mesh of ``zkd_jax.parallel`` (batch sharded on ``"data"``, the rest replicated), so BatchNorm
statistics and gradients are those of the *global* batch: the step computes the same numbers on 1 or
N devices.

``train_step(state, teacher_variables, batch, epoch) -> (state, metrics)``:

1. teacher forward in eval mode on every view the method uses, under ``stop_gradient``
   (:class:`TeacherCall`: the ViT recipe's teacher sees ``teacher_input`` of the students' images
   and runs in train mode, BatchNorm with the batch's statistics, its updates discarded);
2. student forward in train mode (BatchNorm with batch statistics, running averages updated; for
   MLKD the weak view first, then the strong one, as the reference calls the student twice;
   with ``return_heads=True`` when the method asks, ``methods.wants_heads``: DeiT's two heads);
3. the method's objective, its gradient w.r.t. ``params = {"student", "method"}``;
4. the optax update (``state`` is donated);
5. metrics: ``loss``, the method's terms and ``lr``, float32 scalars, plus ``grad_norm`` (global
   L2 norm of the gradient), ``teacher_finite`` and ``params_finite`` (1.0 when every teacher
   logit / updated parameter is finite, else 0.0): the epoch loop stops a run on any of them.

``epoch`` is a traced int32 scalar (counted from 1): DKD's warm-up and CTKD's curriculum change
every epoch without recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from zkd_jax.methods import Method, head_logits, wants_heads
from zkd_jax.models.layers import folded_batchnorm
from zkd_jax.parallel import batch_sharding, replicated
from zkd_jax.step.state import TrainState, model_variables
from zkd_jax.views import images_of, teacher_input

TrainStep = Callable[[TrainState, Any, Mapping[str, Any], Any], tuple[TrainState, dict]]


def _float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@dataclasses.dataclass(frozen=True)
class TeacherCall:
    """How the teacher sees a batch.

    Attributes:
      image_size: None: the students' images as they are; else ``teacher_input(x, image_size)``
        (``zkd_jax.views``: what bilinear resizing to that size picks, the ViT recipe).
      batch_stats: False: eval mode (running statistics); True: train mode, BatchNorm normalizing
        with the batch's statistics and the updated running averages discarded (the ViT reference
        runs its teacher under ``model.train()``).
      folded: the teacher variables have their BatchNorms folded into the convolutions
        (``zkd_jax.models.fold.fold_batchnorm``; eval mode only): the teacher runs under
        ``folded_batchnorm()``, each BatchNorm a bias add.
    """

    image_size: int | None = None
    batch_stats: bool = False
    folded: bool = False


def teacher_forward(teacher, teacher_variables, images: Mapping[str, Any], method: Method,
                    call: TeacherCall = TeacherCall()):
    """Teacher logits per view (float32, ``stop_gradient``; eval mode unless ``call`` says
    otherwise); None without a teacher."""
    if not method.needs_teacher:
        return None

    if call.folded and call.batch_stats:
        raise ValueError("a folded teacher runs in eval mode only (TeacherCall.batch_stats=False).")

    def run(x):
        if call.image_size is not None:
            x = teacher_input(x, call.image_size)
        if call.batch_stats:
            logits, _ = teacher.apply(teacher_variables, x, train=True, mutable=["batch_stats"])
        else:
            with folded_batchnorm(call.folded):
                logits = teacher.apply(teacher_variables, x, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    with jax.named_scope("teacher"):
        return {view: run(x) for view, x in images.items()}


def finite_checks(teacher_logits, grads, params) -> dict[str, jax.Array]:
    """``grad_norm`` (``sqrt(sum g^2)`` over every gradient leaf), ``teacher_finite`` and
    ``params_finite`` (1.0 if all finite, else 0.0; ``teacher_finite`` is 1.0 without teacher)."""

    def all_finite(tree) -> jax.Array:
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

    return {
        "grad_norm": optax.tree.norm(grads),
        "teacher_finite": all_finite(teacher_logits).astype(jnp.float32),
        "params_finite": all_finite(params).astype(jnp.float32),
    }


def make_student_update(
    student: nn.Module,
    objective: Callable[..., tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    heads: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
    """Steps 2-5 of the module docstring for ONE student, as a plain (un-jitted) function.

    ``heads``: call the student with ``return_heads=True`` and hand the objective every head
    (``methods.head_logits``).

    ``update(state, teacher_logits, images, labels, epoch) -> (state, metrics)`` where ``images``
    maps a view name to ``[B, H, W, C]``, ``teacher_logits`` a view name to ``[B, classes]`` (or
    None), and ``objective`` is a method's ``objective`` (``zkd_jax.methods``). ``make_train_step``
    jits it behind one teacher forward; ``zkd_jax.step.multi`` maps it over K stacked students.
    """

    def update(state: TrainState, teacher_logits, images, labels, epoch):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            batch_stats = state.batch_stats
            student_logits = {}
            for i, (view, x) in enumerate(images.items()):
                variables = model_variables(params["student"], batch_stats, state.buffers)
                logits, updates = student.apply(
                    variables, x, train=True, mutable=["batch_stats"],
                    rngs={"dropout": jax.random.fold_in(rng, i)},
                    **({"return_heads": True} if heads else {}),
                )
                batch_stats = updates.get("batch_stats", batch_stats)
                if heads:
                    student_logits.update(head_logits(view, _float32(logits)))
                else:
                    student_logits[view] = logits.astype(jnp.float32)
            with jax.named_scope("objective"):
                loss, terms = objective(params["method"], student_logits, teacher_logits, labels,
                                        epoch)
            return loss, (terms, batch_stats)

        with jax.named_scope("student"):
            (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params
            )
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        with jax.named_scope("finite_checks"):
            checks = finite_checks(teacher_logits, grads, params)
        metrics = {"loss": loss, **terms, **checks}
        if learning_rate_fn is not None:
            metrics["lr"] = learning_rate_fn(state.step)
        return new_state, _float32(metrics)

    return update


def make_train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    method: Method,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    teacher_call: TeacherCall = TeacherCall(),
) -> TrainStep:
    """Builds the jitted, sharded ``train_step(state, teacher_variables, batch, epoch)``.

    Args:
      student: linen module, ``apply(variables, x, train=..., mutable=["batch_stats"])``.
      teacher: linen module run in eval mode, or None for a method without teacher.
      method: see ``zkd_jax.methods``.
      tx: the optax transformation (``zkd_jax.optim.sgd``).
      mesh: 1-D mesh with axis "data" (``zkd_jax.parallel.create_mesh``).
      learning_rate_fn: the schedule, to report ``lr`` (of this update) in the metrics.
      teacher_call: how the teacher sees the batch (:class:`TeacherCall`; default eval mode on the
        students' images).

    Returns:
      One ``jax.jit`` function; ``state`` (arg 0) is donated. Inputs: ``teacher_variables``
      replicated, ``batch`` (dict of global arrays: "image", "label"[, "image_strong"]) sharded on
      axis 0, ``epoch`` an int32 scalar counted from 1.
    """
    if method.needs_teacher and teacher is None:
        raise ValueError("this method distills from a teacher; pass the teacher module.")

    update = make_student_update(student, method.objective, tx,
                                 learning_rate_fn=learning_rate_fn, heads=wants_heads(method))

    def train_step(state: TrainState, teacher_variables, batch, epoch):
        labels = batch["label"]
        images = images_of(batch, method.views)
        teacher_logits = teacher_forward(teacher, teacher_variables, images, method, teacher_call)
        return update(state, teacher_logits, images, labels, epoch)

    return jit_train_step(train_step, mesh)


def jit_train_step(train_step: Callable, mesh: Mesh) -> TrainStep:
    """``jax.jit`` of ``train_step(state, teacher_variables, batch, epoch) -> (state, metrics)``
    with the mesh's shardings: the batch sharded on ``"data"``, everything else replicated, and
    ``state`` donated. The plain function stays reachable as the result's ``unjitted`` attribute
    (``zkd_jax.step.scan`` runs several of it in one program)."""
    rep = replicated(mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(rep, rep, batch_sharding(mesh), rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    jitted.unjitted = train_step
    return jitted


__all__ = ["TeacherCall", "TrainStep", "finite_checks", "jit_train_step", "make_student_update",
           "make_train_step", "teacher_forward"]

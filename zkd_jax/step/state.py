"""The train state: everything a checkpoint holds, as one pytree.

``params`` is ``{"student": <the student's params>, "method": <the method's own params>}``;
``method`` is ``{}`` except for CTKD, whose learnable global temperature lives at
``params["method"]["global_t"]`` so that the student's optimizer (momentum and coupled weight decay)
trains it too. ``batch_stats`` are the student's BatchNorm running statistics; ``buffers`` its fixed
tensors (T2T-ViT's sinusoid table and Performer features: part of the model, never trained; ``{}``
for every other model), carried so that checkpoints and evaluation have them. ``rng`` is the base
key of in-step randomness (``jax.random.PRNGKey`` data, uint32[2]); the step folds it with ``step``
so that a resumed run draws the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zkd_jax.methods import Method


@flax.struct.dataclass
class TrainState:
    """Student params (+ method params), BatchNorm statistics, optimizer state, step, key and the
    student's fixed ``buffers``."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]
    buffers: Any = flax.struct.field(default_factory=dict)


def _init_function(module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[jax.Array], dict]:
    """``init(rng)``: ``module.init`` on zeros of ``input_shape`` in eval mode (not jitted)."""

    def init(rng):
        return module.init(rng, jnp.zeros(tuple(input_shape), jnp.float32), train=False)

    return init


def make_initializer(
    module: nn.Module, input_shape: tuple[int, ...], *, mesh: Mesh | None = None
) -> Callable[[jax.Array], dict]:
    """``init(rng)``: one compiled ``module.init`` on zeros of ``input_shape`` in eval mode
    (replicated over ``mesh``); reuse it for several seeds of one model (XLA takes seconds to
    compile a model's init)."""
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(_init_function(module, input_shape), out_shardings=sharding)

    def call(rng):
        # The non-partitionable threefry compiles ~4x faster on CPU (the initial state is computed
        # replicated, so partitionability buys nothing here). Where the switch is gone, the default.
        switch = getattr(jax, "threefry_partitionable", None)
        with switch(False) if switch is not None else contextlib.nullcontext():
            return jitted(rng)

    return call


def init_variables(
    module: nn.Module, rng: jax.Array, input_shape: tuple[int, ...], *, mesh: Mesh | None = None
) -> dict:
    """``module.init`` on zeros of ``input_shape`` in eval mode (replicated over ``mesh``)."""
    return make_initializer(module, input_shape, mesh=mesh)(rng)


def create_train_state(
    student: nn.Module,
    method: Method,
    tx: optax.GradientTransformation,
    *,
    init_rng: jax.Array,
    step_rng: jax.Array,
    input_shape: tuple[int, ...],
    mesh: Mesh | None = None,
    init: Callable[[jax.Array], dict] | None = None,
) -> TrainState:
    """Initializes the student and the method's parameters and the optimizer state.

    With a ``mesh`` the state is created directly replicated over it (one jit with out_shardings).

    Args:
      student: any linen module with the ``(x, train)`` signature.
      method: the distillation method (its ``init_params`` go to ``params["method"]``).
      tx: the optax transformation.
      init_rng: key of the parameter initializers.
      step_rng: base key of in-step randomness.
      input_shape: ``(1, H, W, C)`` of one example batch.
      mesh: where the state lives (replicated); None: default device.
      init: ``make_initializer(student, input_shape, mesh=mesh)``, to share one compiled init
        between several states (default: built here).
    """
    init = init or make_initializer(student, input_shape, mesh=mesh)
    variables = init(init_rng)
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    assemble = functools.partial(_assemble_state, method=method, tx=tx)
    return jax.jit(assemble, out_shardings=sharding)(variables, step_rng)


def _assemble_state(variables: dict, step_rng: jax.Array, *, method: Method,
                    tx: optax.GradientTransformation) -> TrainState:
    """The train state at step 0 of a student's initial ``variables``."""
    params = {"student": variables["params"], "method": method.init_params()}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=step_rng,
        buffers=variables.get("buffers", {}),
    )


def replicated_shapes(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (arrays or ``jax.ShapeDtypeStruct``) as ``ShapeDtypeStruct``s replicated over
    ``mesh``: what a compile-only program takes for a replicated argument."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def abstract_variables(module: nn.Module, input_shape: tuple[int, ...], mesh: Mesh) -> dict:
    """The shapes of :func:`init_variables` (``jax.eval_shape``: nothing runs on a device),
    replicated over ``mesh``.

    >>> import flax.linen as nn, jax
    >>> from zkd_jax.parallel import create_mesh
    >>> v = abstract_variables(nn.Dense(3), (1, 5), create_mesh(jax.devices("cpu")[:1]))
    >>> v["params"]["kernel"].shape
    (5, 3)
    """
    return replicated_shapes(
        jax.eval_shape(_init_function(module, input_shape), jax.random.PRNGKey(0)), mesh)


def abstract_train_state(student: nn.Module, method: Method, tx: optax.GradientTransformation,
                         *, input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
    """The shapes of :func:`create_train_state` (the same code under ``jax.eval_shape``; nothing
    runs on a device), replicated over ``mesh``: a compile-only program's state argument."""

    def create(rng):
        variables = _init_function(student, input_shape)(rng)
        return _assemble_state(variables, rng, method=method, tx=tx)

    return replicated_shapes(jax.eval_shape(create, jax.random.PRNGKey(0)), mesh)


def model_variables(params: Any, batch_stats: Any, buffers: Any) -> dict:
    """``{"params", "batch_stats", "buffers"}`` for ``module.apply``, without the empty ones."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if buffers:
        variables["buffers"] = buffers
    return variables


def student_variables(state: TrainState) -> dict:
    """The student's variables (``params`` and, if any, ``batch_stats`` and ``buffers``) for
    ``module.apply``."""
    return model_variables(state.params["student"], state.batch_stats, state.buffers)

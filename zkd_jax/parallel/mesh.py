"""The mesh every program runs on, its shardings, and moving arrays between hosts and devices.

One ``Mesh`` with a single axis ``"data"`` spans all devices of all processes. Batches are sharded on
their leading axis over ``"data"``; parameters, optimizer state and metrics are replicated. Under
``jax.jit`` with these shardings XLA inserts the cross-device reductions, so BatchNorm statistics and
gradients are those of the *global* batch: a step computes the same numbers on 1 or N devices.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices``.

    Pass the devices explicitly (the trainer passes ``jax.devices()``, ``zkd-compile`` a TPU
    topology's devices): the default, ``jax.devices()``, is the default backend's, which is the
    CPU on a machine without accelerators whatever the program is meant for.

    Raises:
      ValueError: ``devices`` is empty.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("create_mesh needs at least one device; pass jax.devices() or the "
                         "devices of a TPU topology.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def abstract_batch(shapes: Mapping[str, tuple[tuple[int, ...], Any]],
                   mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """``{key: (global shape, dtype)}`` -> ``ShapeDtypeStruct``s sharded like
    :func:`host_to_global`'s output (leading axis over ``"data"``): a compile-only program's
    batch, where ``host_to_global`` cannot run (no device, or a compile-only TPU client).

    Raises:
      ValueError: a leading axis that does not split evenly over the mesh's devices.

    >>> m = create_mesh(jax.devices("cpu")[:1])
    >>> abstract_batch({"label": ((8,), np.int32)}, m)["label"].shape
    (8,)
    """
    sharding = batch_sharding(mesh)
    n = mesh.devices.size
    out = {}
    for key, (shape, dtype) in shapes.items():
        if shape[0] % n:
            raise ValueError(
                f"batch entry {key!r} has {shape[0]} rows, which is not divisible by the {n} "
                f"devices of the mesh; use a global batch size that is a multiple of {n}.")
        out[key] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading axis split over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, *, what: str = "config.batch_size") -> int:
    """Returns the per-process batch size; raises if the batch does not split evenly.

    Raises:
      ValueError: ``global_batch_size`` is not a multiple of the mesh's device count.
    """
    n = mesh.devices.size
    if global_batch_size < 1 or global_batch_size % n:
        nearest = max(n, round(global_batch_size / n) * n)
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {n} devices of the mesh; "
            f"set {what} to a multiple of {n} (e.g. {nearest})."
        )
    return global_batch_size // jax.process_count()


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's share of a batch (NumPy, leading axis = batch) -> global ``jax.Array``s.

    Every process passes its own rows (``per_process_batch = global_batch / process_count``); the
    result is sharded over the mesh's ``"data"`` axis.

    Raises:
      ValueError: the global batch does not split evenly over the mesh's devices.
    """
    sharding = batch_sharding(mesh)
    n, processes = mesh.devices.size, jax.process_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        rows = value.shape[0] * processes
        if rows % n:
            raise ValueError(
                f"batch entry {key!r} has {rows} rows in all ({value.shape[0]} per process x "
                f"{processes} processes), which is not divisible by the {n} devices of the mesh; "
                f"use a global batch size that is a multiple of {n} (e.g. {max(n, rows // n * n)})."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def prefetch_to_mesh(
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    *,
    size: int = 2,
    then: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """``host_to_global`` of each host batch, ``size`` batches ahead of the consumer.

    Yields ``then(host_to_global(b, mesh))`` (or ``host_to_global(b, mesh)``) for each ``b`` of
    ``batches``, in order. Before the consumer receives batch ``i``, the copies of batches
    ``i + 1 .. i + size - 1`` have been started too (the copies and a jitted ``then`` are
    dispatched asynchronously), so the transfers overlap the step that uses batch ``i``: flax's
    ``jax_utils.prefetch_to_device`` for the mesh's sharded global batches. ``size=1``: no
    read-ahead.

    Raises:
      ValueError: ``size < 1`` (or, from ``host_to_global``, a batch that does not split evenly).
    """
    if size < 1:
        raise ValueError(f"prefetch size={size} must be >= 1.")
    queue: collections.deque = collections.deque()
    for batch in batches:
        out = host_to_global(batch, mesh)
        queue.append(out if then is None else then(out))
        if len(queue) == size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (identical on every process) -> arrays replicated over ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def to_host(tree: Any) -> Any:
    """NumPy copy of a (replicated) pytree; works when arrays span other processes' devices.

    Every device-to-host copy is started before the first is awaited, so fetching N scalars costs
    about one transfer's latency, not N.
    """

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        if isinstance(x, jax.Array):
            x.copy_to_host_async()
        return x

    return jax.tree.map(np.asarray, jax.tree.map(local, tree))


__all__ = ["DATA_AXIS", "abstract_batch", "batch_sharding", "check_batch_size", "create_mesh", "host_to_global",
           "replicate", "replicated", "to_host"]

"""Where programs run: the mesh and its shardings, host <-> device moves, the multi-process start.

Imports JAX only (no files, no training loop).
"""

from zkd_jax.parallel.mesh import (
    DATA_AXIS,
    abstract_batch,
    batch_sharding,
    check_batch_size,
    create_mesh,
    host_to_global,
    prefetch_to_mesh,
    replicate,
    replicated,
    to_host,
)

__all__ = ["DATA_AXIS", "abstract_batch", "batch_sharding", "check_batch_size", "create_mesh", "host_to_global",
           "prefetch_to_mesh", "replicate", "replicated", "to_host"]

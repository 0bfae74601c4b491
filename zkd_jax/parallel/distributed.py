"""Start JAX's multi-process runtime when (and only when) a run spans several processes.

One call, :func:`initialize`, made by the trainer before any JAX computation:

* on a multi-host Cloud TPU VM (a pod slice) it calls ``jax.distributed.initialize()`` without
  arguments; JAX then reads the coordinator, the process count and this host's index from the TPU
  VM's metadata;
* with explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` (from the config, or the
  environment variables ``ZKD_COORDINATOR_ADDRESS`` / ``ZKD_NUM_PROCESSES`` / ``ZKD_PROCESS_ID``) it
  passes them on; this is how the tests start two CPU processes on one machine;
* on a single host (one GPU box, a v4-8, a laptop) it does nothing: one process drives all local
  devices, no coordinator is needed.

Environment variables read here (the launch scripts set them):

=========================  ==========================================================================
``ZKD_DISTRIBUTED``        ``1``/``true``: initialize (JAX detects the cluster); ``0``/``false``:
                           never initialize, whatever else says so. Unset: decide automatically.
``ZKD_COORDINATOR_ADDRESS``  ``host:port`` of process 0's coordinator service.
``ZKD_NUM_PROCESSES``      number of processes of the run.
``ZKD_PROCESS_ID``         this process's index, ``0 .. num_processes - 1``.
=========================  ==========================================================================

With ``enabled="auto"`` and no explicit coordinator, JAX's own cluster detection decides:
``jax.distributed.initialize()`` is called without arguments and finds the cluster by itself (Cloud
TPU VMs and pods through their metadata, GKE, Slurm, Open MPI, mpi4py: whatever the installed JAX
knows); where it finds none (one GPU box, a laptop) it raises, and the run stays a single process.
``config.distributed.enabled=False`` (or ``ZKD_DISTRIBUTED=0``) skips the attempt.

This module imports only ``jax`` (never TensorFlow).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

ENV_ENABLED = "ZKD_DISTRIBUTED"
ENV_COORDINATOR_ADDRESS = "ZKD_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ZKD_NUM_PROCESSES"
ENV_PROCESS_ID = "ZKD_PROCESS_ID"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_enabled(value: bool | str | None, what: str) -> bool | str:
    """Normalises ``True`` / ``False`` / ``"auto"`` (or their string spellings) to bool or "auto"."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"{what}={value!r} is not understood; use True, False or 'auto'."
    )


def _explicit_args(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    env: Mapping[str, str],
) -> tuple[str, int, int] | None:
    """Merges the arguments with the ``ZKD_*`` variables; None when none of the three is given."""
    address = coordinator_address or env.get(ENV_COORDINATOR_ADDRESS) or None
    count = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
    count = None if count in (None, "") else count
    index = None if index in (None, "") else index
    given = [v is not None for v in (address, count, index)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(
            "Give coordinator_address, num_processes and process_id together (config.distributed "
            f"or {ENV_COORDINATOR_ADDRESS}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}), or none of them "
            "to let JAX detect the cluster."
        )
    try:
        count, index = int(count), int(index)
    except (TypeError, ValueError):
        raise ValueError(
            f"num_processes={count!r} and process_id={index!r} must be integers; fix the config "
            "or the ZKD_* environment variables."
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"process_id={index} must lie in [0, num_processes={count}); give each process a "
            "distinct index below the process count."
        )
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"coordinator_address={address!r} must read 'host:port' (e.g. '10.0.0.2:8476')."
        )
    return str(address), count, index


def _platforms() -> list[str]:
    """The platforms JAX was asked for (``jax_platforms`` / ``JAX_PLATFORMS``); [] when unset."""
    value = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return [p.strip().lower() for p in value.split(",") if p.strip()]


def _ensure_cpu_collectives() -> None:
    """Makes sure cross-process collectives work on the CPU backend.

    In jax 0.10 the CPU client gets cross-process collectives only when
    ``jax_cpu_collectives_implementation`` names one ("gloo", the default since jax 0.5, or "mpi");
    with None, an all-reduce over devices of several processes fails at run time. The option must be
    set before the backend is created, i.e. before ``jax.distributed.initialize``. A value the user
    chose ("mpi") is left alone.
    """
    platforms = _platforms()
    if platforms and "cpu" not in platforms:
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_initialized() -> bool:
    """Whether ``jax.distributed`` has been initialized in this process."""
    return jax.distributed.is_initialized()


def initialize(
    *,
    enabled: bool | str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Initializes ``jax.distributed`` when the run spans several processes; otherwise does nothing.

    Must be called before anything touches a JAX backend (``jax.devices()``, ``jnp`` arrays, jit).
    A second call is a no-op once the runtime is up.

    Decision, first match wins:
      1. ``ZKD_DISTRIBUTED=0`` in the environment, or ``enabled=False``: nothing.
      2. explicit arguments (or ``ZKD_COORDINATOR_ADDRESS``, ``ZKD_NUM_PROCESSES``,
         ``ZKD_PROCESS_ID``): ``jax.distributed.initialize(address, count, index)``.
      3. ``enabled=True`` or ``ZKD_DISTRIBUTED=1``: ``jax.distributed.initialize()``, JAX
         detecting the cluster; finding none is an error.
      4. ``"auto"``: ``jax.distributed.initialize()`` as in 3; where JAX detects no cluster, or
         the process already started JAX's backend (it can no longer join one), nothing.

    On the CPU platform, cross-process collectives ("gloo") are switched on first.

    Args:
      enabled: True, False or "auto" (strings "true"/"false"/"1"/"0" are accepted, since config
        overrides on the command line arrive as text).
      coordinator_address: ``host:port`` of process 0, e.g. ``"127.0.0.1:12355"``.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      timeout_s: seconds to wait for all processes to join the coordinator.

    Raises:
      ValueError: an unreadable ``enabled``, or coordinator arguments incomplete or out of range.
      RuntimeError: called after the JAX backend was already created in a single-process mode.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    mode = _parse_enabled(enabled, "config.distributed.enabled")
    env_mode = _parse_enabled(env.get(ENV_ENABLED), ENV_ENABLED)
    if mode is False or env_mode is False:
        return
    explicit = _explicit_args(coordinator_address, num_processes, process_id, env)
    required = mode is True or env_mode is True
    _ensure_cpu_collectives()
    try:
        if explicit is None:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        else:
            address, count, index = explicit
            jax.distributed.initialize(
                coordinator_address=address,
                num_processes=count,
                process_id=index,
                initialization_timeout=timeout_s,
            )
    except RuntimeError as err:
        if "before any JAX" not in str(err):
            raise
        if explicit is None and not required:
            return  # auto: JAX already runs as one process here
        raise RuntimeError(
            "zkd_jax.parallel.distributed.initialize() must run before any JAX computation or "
            "jax.devices() call in this process; call it first in main()."
        ) from err
    except ValueError as err:
        if explicit is not None:
            raise
        if not required:
            return  # auto: JAX detected no cluster; a single-process run
        raise ValueError(
            "Distributed mode is on but JAX found no cluster to join; set "
            "config.distributed.coordinator_address/num_processes/process_id (or the ZKD_* "
            "variables), or run on a multi-host TPU VM."
        ) from err


def shutdown() -> None:
    """Shuts the distributed runtime down (no-op when it is not running)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()

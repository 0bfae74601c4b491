"""The suite's XLA settings, and a test's script run in a fresh Python with N virtual CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX starts, hence the
subprocess. The script prints ``RESULT <json>``; the last such line is returned, decoded.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys


#: The suite's own ``XLA_FLAGS`` (set in tests/conftest.py, whose docstring says why): XLA:CPU's
#: classic fusion emitters.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


@contextlib.contextmanager
def every_xla_optimization():
    """Compiles with every XLA optimization inside the block, as users do (the suite turns most of
    them off: tests/conftest.py)."""
    import jax  # noqa: PLC0415

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def with_devices(devices: int, more: str = "") -> str:
    """``XLA_FLAGS`` for a subprocess: the suite's own (tests/conftest.py), ``devices`` virtual CPU
    devices and ``more``."""
    return " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""),
                                  f"--xla_force_host_platform_device_count={devices}", more)))


def run_on_cpu_devices(script: str, devices: int, cwd, timeout: int = 300, xla_flags: str = "") -> dict:
    """``xla_flags``: more ``XLA_FLAGS`` (e.g. ``--xla_backend_optimization_level=0``)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(devices, xla_flags))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])

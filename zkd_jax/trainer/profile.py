"""A ``jax.profiler`` trace of a few training steps after warm-up (``config.profile_steps``).

The trace (TensorBoard's profile plugin or Perfetto reads it) goes to ``<directory>/plugins/profile/
<run>/*.xplane.pb``. :class:`StepProfiler` starts it before call number ``start`` of the run
(counted from the run's first step, so compilation and warm-up stay outside), and stops it, after
waiting for the device, once ``steps`` steps have run inside it.
"""

from __future__ import annotations

from typing import Any

import jax


class StepProfiler:
    """Traces steps ``[first + start, first + start + steps)`` of a run (``steps = 0``: off)."""

    def __init__(self, directory, *, steps: int, start: int):
        if steps < 0 or start < 0:
            raise ValueError(f"profile_steps ({steps}) and profile_start_step ({start}) must be "
                             ">= 0; set profile_steps=N > 0 to trace N steps.")
        self.directory, self.steps, self.start = str(directory), steps, start
        self.first: int | None = None
        self.traced = 0
        self.active = False
        self.done = steps == 0

    def before(self, step: int) -> None:
        """Called before the call that runs from global ``step``; may start the trace."""
        if self.first is None:
            self.first = step
        if not self.done and not self.active and step - self.first >= self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, count: int, outputs: Any) -> None:
        """Called after a call of ``count`` steps; stops the trace (waiting for ``outputs``)."""
        if not self.active:
            return
        self.traced += count
        if self.traced >= self.steps:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        """Ends the trace if one runs (after the device finished ``outputs``)."""
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active, self.done = False, True

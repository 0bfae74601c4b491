"""Preemption: SIGTERM (or JAX's multi-host preemption notice) -> a checkpoint at the next step.

Cloud TPU spot and preemptible VMs, and GPU schedulers (Slurm, Kubernetes), send SIGTERM some
seconds before they stop a job. :class:`PreemptionWatch` turns that notice into a stop at a step
boundary that every process agrees on; the epoch loop (``zkd_jax.trainer.loop``) then writes a
checkpoint there (mid-epoch checkpoints carry the epoch's running loss sums, so the resumed epoch
logs the same means), waits until it is on disk and raises :class:`Preempted`; ``zkd-train`` ends
with exit code :data:`EXIT_CODE` (75) and the line ``preempted: checkpoint saved at step S; rerun the
same command to resume``. The launch scripts rerun it on 75.

* One process: a Python SIGTERM handler sets a flag; the loop checks it after each call of the
  train step, so the checkpoint is at the end of the step that was running (a step is never cut).
* Several processes (``jax.distributed``): JAX's preemption service
  (``jax.experimental.multihost_utils.reached_preemption_sync_point``; on by default, it needs the
  distributed client and installs its own SIGTERM listener) spreads a notice that reached any
  process to all of them and picks the step after the furthest one's. The loop asks it after every
  step (its counter: the steps this process has run since it started, the same on every process
  because they all resume from one checkpoint), so all processes stop after the same step. Orbax's
  checkpoint manager asks the same service with checkpoint steps from a background thread, which
  would move the counter back; :class:`PreemptionWatch` keeps orbax out of it while it watches.
  Without the service (``jax_enable_preemption_service=False``), a process cannot know when the
  others stop: SIGTERM then keeps its default (the process ends; the launchers restart from the last
  checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODE = 75


class Preempted(Exception):  # noqa: N818  (not an error: the run stopped on request)
    """The run stopped on a preemption notice after its checkpoint at ``step`` was written."""

    def __init__(self, step: int, workdir: str = ""):
        where = f" in {workdir}" if workdir else ""
        super().__init__(f"preempted: checkpoint saved at step {step}{where}; rerun the same "
                         "command to resume")
        self.step = step


def _sync_manager():
    """JAX's preemption sync manager of a multi-process run, or None."""
    import jax  # noqa: PLC0415

    if jax.process_count() <= 1:
        return None
    from jax._src import distributed  # noqa: PLC0415  (no public accessor in jax 0.10)

    return getattr(distributed.global_state, "preemption_sync_manager", None)


class PreemptionWatch:
    """Watches for a preemption notice while a run trains (``with PreemptionWatch() as w: ...``).

    ``w.stop_after(steps)`` is called once after every call of the train step with the number of
    steps that call ran; True: every process stops here (save, then :class:`Preempted`).
    """

    def __init__(self):
        self.requested = False  # one process: SIGTERM seen
        self._previous = None
        self._manager = None
        self._counter = 0  # steps run since this process started (multi-process)
        self._orbax_patch = None

    # -- one process ---------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if not self.requested:
            print("SIGTERM received: the run stops after this step, with a checkpoint",
                  flush=True)
        self.requested = True

    def __enter__(self) -> PreemptionWatch:
        self._manager = _sync_manager()
        if self._manager is not None:
            self._keep_orbax_out()
        elif threading.current_thread() is threading.main_thread():
            import jax  # noqa: PLC0415

            if jax.process_count() == 1:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._orbax_patch is not None:
            cls, original = self._orbax_patch
            cls.reached_preemption = original
            self._orbax_patch = None

    def _keep_orbax_out(self) -> None:
        import orbax.checkpoint as ocp  # noqa: PLC0415

        cls = ocp.CheckpointManager
        original = cls.__dict__.get("reached_preemption")
        if original is None:
            return
        cls.reached_preemption = lambda self, step: False  # the trainer decides preemption saves
        self._orbax_patch = (cls, original)

    def stop_after(self, steps: int) -> bool:
        """Whether to stop after the call that ran ``steps`` more steps."""
        if self._manager is None:
            return self.requested
        from jax.experimental import multihost_utils  # noqa: PLC0415

        hit = False
        for _ in range(steps):  # the service's counter moves by one per step
            self._counter += 1
            hit = multihost_utils.reached_preemption_sync_point(self._counter) or hit
        return hit


__all__ = ["EXIT_CODE", "Preempted", "PreemptionWatch"]

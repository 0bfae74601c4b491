"""The plan of an epoch's calls: how many training steps each jitted call runs.

``config.steps_per_call = n`` (> 1, on-device input only) runs scans of ``n`` steps in one program
(``zkd_jax.step.scan``); :func:`plan` cuts an epoch into such calls: scans aligned to the epoch's
start, single steps where a scan would run past the epoch's end (or ``config.max_steps``) or over a
``config.checkpoint_every_steps`` boundary. A run resumed at an epoch boundary therefore repeats the
uninterrupted run's calls exactly.
"""

from __future__ import annotations

from collections.abc import Iterator


def check_steps_per_call(steps_per_call: int, pipeline: str) -> int:
    """``steps_per_call`` as an int >= 1; raises ``ValueError`` saying what to set otherwise."""
    n = int(steps_per_call)
    if n < 1:
        raise ValueError(f"config.steps_per_call={steps_per_call} must be >= 1 (1: one step per "
                         "call, the default).")
    if n > 1 and pipeline != "device":
        raise ValueError(
            f"config.steps_per_call={n} builds the batches inside the scanned program, which only "
            "the on-device input path can do; set config.input_pipeline='device' (CIFAR-100, "
            "digits) or config.steps_per_call=1.")
    return n


def plan(start: int, end: int, *, epoch_start: int, n: int,
         checkpoint_every: int = 0) -> Iterator[int]:
    """Sizes of the calls that take the global step count from ``start`` to ``end``.

    A scan (size ``n``) starts where ``(step - epoch_start) % n == 0``, ends at or before ``end``,
    and has no multiple of ``checkpoint_every`` (> 0) strictly inside (a checkpoint lands exactly
    at the end of a call); every other step is a call of size 1.
    """
    step, every = start, checkpoint_every
    while step < end:
        crosses = every > 0 and (step + n - 1) // every > step // every
        if n > 1 and (step - epoch_start) % n == 0 and step + n <= end and not crosses:
            yield n
            step += n
        else:
            yield 1
            step += 1


__all__ = ["check_steps_per_call", "plan"]
